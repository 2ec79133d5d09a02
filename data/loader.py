"""The loaders a rank uses: `TrainLoader` (the training order of `data.order`, loader workers that persist across
epochs, windows read as ranged reads) and `eval_loader` (a split, every sample exactly once over the ranks).

TrainLoader, per rank:

- The rank's slot streams are split into contiguous shares, one per loader worker. For every step from the start
  step, loader worker l yields the part of the rank's batch its streams produce (possibly empty); the
  DataLoader's in-order round robin hands over part l of step k as item (k - start) * L + l, and the main
  process joins the L parts of a step in stream order. So the batch does not depend on L at all.
- Each loader worker has one read-ahead thread that reads, window after window, the window of each of its
  streams as one ranged read per shard piece (`data.reader.RangeReader`), holding at most one window per
  stream ahead of the one being served. A resume at step k starts at the window holding k.
- Loader workers start once (`persistent_workers=True`) and learn the epoch and start step of each new pass from
  a small array in shared memory (as timm and webdataset share the epoch with theirs).
- Augmentation randomness is seeded per sample by (seed, epoch, position): pixels do not depend on the shape.
- Each sample is made crop first (`data.batch.CropFirst`): the crop is drawn from the image size, then
  `decode="cpu"` decodes only what the crop needs at the scale it needs, while `decode="gpu"` leaves the bytes
  compressed and batches them with the crops for `data.gpu_decode.device_batch` on the training device.
- At every epoch start the index is read again (one small file): if `jobs.prepare` replaced it, the pass stops with
  IndexChangedError rather than mix two datasets.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import BatchMaker, CorruptTally, CropFirst, DecodeThen, join_batches
from data.index import DatasetIndex, check_index_unchanged, read_index
from data.options import StreamOptions
from data.order import TrainOrder, loader_worker_streams, order_fingerprint, pieces_of, rank_streams, seed_of
from data.reader import RangeReader, ReadAhead, eval_range, sample_bytes
from data.transforms import ten_crop_transform


EVAL_READAHEAD_BYTES = 64 << 20  # raw sample bytes an evaluation loader worker's read-ahead thread may hold
MMAP_THRESHOLD = 64 << 10  # bytes; glibc serves larger allocations with mmap in loader workers
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _loader_worker_init(loader_worker: int) -> None:
    """Make glibc serve allocations of 64 KiB and more (JPEG members, window reads) with mmap, so that freeing them
    returns the memory. Otherwise glibc's dynamic threshold rises to the size of a window read and the heap
    fragments: at the ImageNet settings this took a rank's peak PSS from 1.88 GB to 1.26 GB (BENCHMARKS.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators need no such setting here
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class _RankParts(IterableDataset):
    """Iterated in a loader worker (or in-process): the parts of one rank's batches that its streams produce."""

    def __init__(self, opts: StreamOptions, order: TrainOrder, streams: range, clock, rows: CropFirst,
                 rank: int) -> None:
        self.opts, self.order, self.streams, self.clock, self.rows = opts, order, streams, clock, rows
        self.rank = rank
        self.shard_samples = {s.name: s.samples for s in order.shards}
        self.mean_sample_bytes = sum(s.bytes for s in order.shards) / max(order.samples, 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, loader_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = int(self.clock[0]), int(self.clock[1])
        return self.parts(epoch, start, loader_worker, loader_workers)

    def parts(self, epoch: int, start: int, loader_worker: int, loader_workers: int) -> Iterator[dict]:
        order = self.order
        mine = loader_worker_streams(self.streams, loader_worker, loader_workers)
        if start >= order.steps_per_epoch:
            return
        reader = RangeReader(self.opts.url, cache_shards=4 * len(mine) + 8)
        ahead = ReadAhead(lambda: self._windows(reader, epoch, mine, order.window_of(start)),
                          max(1, int(len(mine) * order.window * self.mean_sample_bytes)), name="window-read-ahead")
        windows = iter(ahead)
        maker = BatchMaker(self.rows, self.opts.image_size, self.opts.max_corrupt_fraction,
                           f"{self.opts.url} (split 'train', rank {self.rank})")
        current: dict[int, tuple[list[int], list]] = {}
        try:
            for step in range(start, order.steps_per_epoch):
                window = order.window_of(step)
                if step == start or step == order.windows[window]:
                    current = self._next_windows(windows, mine, window)
                offset = step - order.windows[window]
                positions = [current[c][0][offset] for c in mine]
                # a window's samples are in position order from its first position, c * S + the window's start
                raw = [current[c][1][p - c * order.steps_per_epoch - order.windows[window]]
                       for c, p in zip(mine, positions)]
                part = maker.make(raw, [seed_of("augment", order.seed, epoch, p) for p in positions], positions)
                part.update(step=step, loader_worker=loader_worker,
                            stats={"pid": os.getpid(), **reader.stats.as_dict()})
                yield part
            maker.check_all_corrupt()
        finally:
            ahead.close()

    @staticmethod
    def _next_windows(windows: Iterator, mine: range, window: int) -> dict[int, tuple[list[int], list]]:
        current = {}
        for c in mine:
            got_c, got_w, positions, samples = next(windows)
            assert (got_c, got_w) == (c, window), ((got_c, got_w), (c, window))  # read-ahead order = use order
            current[c] = (positions, samples)
        return current

    def _windows(self, reader: RangeReader, epoch: int, mine: range, first: int) -> Iterator[tuple[tuple, int]]:
        """(stream, window, positions in step order, samples in position order) for every window from `first`,
        window-major, stream-minor: the order in which `parts` needs them."""
        shards = self.order.epoch_shards(epoch)
        for window in range(first, len(self.order.windows)):
            for c in mine:
                samples = []
                for piece in self.order.pieces(shards, c, window):
                    samples += reader.read(piece, self.shard_samples[piece.name])
                item = (c, window, self.order.window_order(epoch, c, window), samples)
                yield item, sum(map(sample_bytes, samples))


def train_order(opts: StreamOptions, index: DatasetIndex | None = None) -> TrainOrder:
    """The order `TrainLoader(opts, ...)` follows (steps_per_epoch, windows), from the index, without a loader."""
    return TrainOrder.from_index(index or read_index(opts.url), opts.seed, opts.global_batch_size,
                                 opts.shuffle_buffer_mb, opts.url)


def train_fingerprint(opts: StreamOptions) -> dict:
    """The settings that define the order (`data.order.order_fingerprint`): stored with the training position,
    compared on resume with `data.check_same_order`."""
    return order_fingerprint(train_order(opts), opts.shuffle_buffer_mb)


class TrainLoader:
    """One rank's training batches, created once per rank and iterated per epoch: `for batch in
    loader.epoch(epoch, start_step)` yields exactly `steps_per_epoch - start_step` batches of
    G / world samples (fewer when images are corrupt): {"image": uint8 [b, 3, H, W], "label": int64 [b],
    "key": list[str], "corrupt": list[str], "position": int64 [b] (places in the epoch's order), "step": int}.
    With `opts.decode == "gpu"`, "image" holds the compressed images with "image_offsets" and "crop"
    (data/batch.py), and "corrupt_tally", through which `data.gpu_decode.device_batch` counts images that fail on
    the device against max_corrupt_fraction. Either way the training step takes `device_batch(batch, device, ...)`.

    The ranks' batches of a step, concatenated in rank order, are global batch `step` of the epoch for any world
    size that divides G and any loader-worker count (see data/order.py). Position in an epoch = step x G samples.
    `read_stats` sums what the loader workers asked of storage in the current pass.
    """

    def __init__(self, opts: StreamOptions, rank: int, world: int) -> None:
        self.opts, self.rank, self.world = opts, rank, world
        self.index = read_index(opts.url)
        self.order = train_order(opts, self.index)
        streams = rank_streams(opts.global_batch_size, rank, world)
        self._clock = multiprocessing.Array("q", 2)  # (epoch, start step) of the next pass, shared with loader workers
        rows = CropFirst(opts.image_size, True, opts.crop_scale, opts.auto_augment, opts.decode)
        self._parts = _RankParts(opts, self.order, streams, self._clock, rows, rank)
        workers = opts.loader_workers
        pin = torch.cuda.is_available() if opts.pin_memory is None else opts.pin_memory
        self._loader = DataLoader(self._parts, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                  prefetch_factor=opts.prefetch_factor if workers else None, pin_memory=pin,
                                  worker_init_fn=_loader_worker_init if workers else None,
                                  in_order=True)  # part l of step k is item (k - start) x L + l
        self.read_stats: dict[int, dict] = {}
        self._passes = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    @property
    def fingerprint(self) -> dict:
        """The settings that define the order (see `data.order.order_fingerprint`); store it with the position."""
        return order_fingerprint(self.order, self.opts.shuffle_buffer_mb)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """The batches of `epoch` from `start_step`; first checks that `_index.json` is still the one this loader
        was built from (IndexChangedError otherwise)."""
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"epoch={epoch}, start_step={start_step}: need epoch >= 0 and "
                             f"0 <= start_step <= steps_per_epoch={self.steps_per_epoch}")
        check_index_unchanged(self.opts.url, self.index, "train")
        self._clock[0], self._clock[1] = epoch, start_step
        self.read_stats = {}
        self._passes += 1
        this_pass = self._passes
        parts = iter(self._loader)  # persistent loader workers begin the new pass here
        per_step = max(1, self.opts.loader_workers)
        tally = CorruptTally(self.opts.max_corrupt_fraction, f"{self.opts.url} (split 'train', rank {self.rank})")
        for step in range(start_step, self.steps_per_epoch):
            if self._passes != this_pass:
                raise RuntimeError("TrainLoader.epoch: a newer pass of this loader has started; this one is over")
            group = [next(parts) for _ in range(per_step)]
            for i, part in enumerate(group):
                assert (part["step"], part["loader_worker"]) == (step, i), (part["step"], part["loader_worker"], step)
                self.read_stats[i] = part["stats"]
            batch = join_batches(group)
            if self.opts.decode == "gpu":  # loader workers count what they could not size; the device adds its own
                tally.add(len(batch["key"]) + len(batch["corrupt"]), len(batch["corrupt"]), batch["corrupt"])
                batch["corrupt_tally"] = tally
            yield batch

    def io_totals(self) -> dict:
        """Requests, bytes, samples read and offset scans of the current pass, summed over loader workers."""
        keys = ("requests", "bytes", "samples", "offset_scans")
        return {k: sum(s[k] for s in self.read_stats.values()) for k in keys}

    def close(self) -> None:
        """Stop the loader workers now (they also stop when the loader is garbage-collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # DataLoader has no public close for persistent workers
        self._loader._iterator = None


class _EvalBatches(IterableDataset):
    """A rank's evaluation batches in index order (a partial last one): loader worker l of L makes batches l, l + L,
    ... (each one or two ranged reads, read ahead on a thread), so the DataLoader's round robin yields them in order."""

    def __init__(self, opts: StreamOptions, split: str, rank: int, world: int, rows) -> None:
        self.opts, self.rows = opts, rows
        info = read_index(opts.url).split(split, opts.url)
        self.shards, self.where = info.shards, f"{opts.url} (split {split!r}, rank {rank})"
        start, size = eval_range(info.samples, rank, world)
        step = opts.eval_batch_size
        self.batches = [(start + b, min(step, size - b)) for b in range(0, size, step)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, loader_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.batches[loader_worker::loader_workers]
        reader = RangeReader(self.opts.url)
        counts = {s.name: s.samples for s in self.shards}

        def produce():
            for start, count in mine:
                raw = [s for p in pieces_of(self.shards, start, start + count) for s in reader.read(p, counts[p.name])]
                yield raw, sum(map(sample_bytes, raw))

        ahead = ReadAhead(produce, EVAL_READAHEAD_BYTES, name="eval-read-ahead")
        maker = BatchMaker(self.rows, self.opts.image_size, self.opts.max_corrupt_fraction, self.where)
        try:
            for raw in ahead:
                yield maker.make(raw)
            maker.check_all_corrupt()
        finally:
            ahead.close()


def eval_loader(opts: StreamOptions, rank: int, world: int, split: str = "val", ten_crop: bool = False) -> DataLoader:
    """A split for evaluation: every sample exactly once over the ranks (rank ranges differ by at most one), index
    order for any loader-worker count, a partial last batch, nothing shuffled; batches as TrainLoader's without
    "position"/"step". The centre crop is drawn from the size and decoded crop first (`center_crop`, equal to the
    resize + centre-crop preset up to rounding), on the CPU or, with `opts.decode == "gpu"`, by `device_batch`.
    `ten_crop`: decoded on the CPU, the preset's resize, then TenCrop: "image" uint8 [b, 10, 3, S, S]."""
    if ten_crop and opts.decode != "cpu":
        raise ValueError(f"eval_loader(ten_crop=True) decodes on the CPU; got decode={opts.decode!r}")
    rows = (DecodeThen(ten_crop_transform(opts.image_size)) if ten_crop
            else CropFirst(opts.image_size, False, decode=opts.decode))
    batches = _EvalBatches(opts, split, rank, world, rows)
    pin = torch.cuda.is_available() if opts.pin_memory is None else opts.pin_memory
    return DataLoader(batches, batch_size=None, num_workers=opts.loader_workers, pin_memory=pin,
                      prefetch_factor=opts.prefetch_factor if opts.loader_workers else None)
