"""ShardStream: one rank's batches of a split, read front to back: the previous per-rank loader. Nothing in the
training or evaluation path uses it (they use `data.TrainLoader` and `data.eval_loader`, whose order does not depend
on the world size); it is kept only as the baseline of `benchmarks/loader_memory.py --previous-loader` and
`benchmarks/data_pipeline.py` (previous_loader), and is not exported by the `data` package.

Order, designed so that resuming mid-epoch is exact with the same world size and any number of loader workers:

- Training: the epoch's order is the shard list shuffled with `Random(seed + epoch)`, concatenated (sample
  counts come from _index.json, nothing is read). Each rank takes Q = N // world_size contiguous samples
  (the remainder is dropped this epoch, like DistributedSampler(drop_last=True)) and yields Q // batch_size
  full batches: the same count on every rank, so DDP never waits on a rank that ran out (webdataset#188).
- The rank's batches are spread over L = max(1, num_workers) loader workers: batch b comes from loader worker
  b % L, and loader worker l reads a contiguous chunk of the rank's range (chunks in loader-worker order),
  shuffles it with a buffer seeded by (seed, epoch, rank, l), and cuts it into batches. The DataLoader's in-order
  round robin then yields batch b of the rank's sequence as output b.
- Resume at `start_batch=k`: each loader worker drops its batches before k after the shuffle buffer and before
  decoding, so batches k.. are identical to an uninterrupted epoch (the DataLoader starts its round robin at
  loader worker 0, so loader worker i plays logical loader worker (i + k) % L). Augmentation draws from a torch
  RNG seeded per batch from (seed, epoch, rank, b), so the pixels match too.
- Evaluation: no shuffle, nothing dropped or duplicated: rank ranges differ in size by at most one and the
  last batch may be partial. Test samples (no labels) get label -1.

I/O (`data.reader`): a background thread per loader worker reads its shard pieces in order into a byte-bounded
buffer (`readahead_bytes`, 64 MiB by default), so the next shard is being fetched while the current one is
decoded. Files are opened with an 8 MiB read-ahead block (ranged GETs on object stores) and members a loader
worker does not need are seeked past, not read. A failed read is retried under `data.storage`'s policy from the last
sample boundary, then fails naming the shard. A shard's byte size is checked against the index before use
(full sha256 checks: `data.shards.verify_shards`). Unsafe tar members are refused (`data.shards`).

Corrupt images are skipped and reported in the batch's "corrupt" list (the batch is smaller; no extra
samples are pulled, so step counts stay equal). If more than `max_corrupt_fraction` of the samples a loader
worker decoded were corrupt (after 50 samples; or all of them, in a smaller set), it raises `CorruptDataError`.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import BatchMaker, CorruptDataError, DecodeThen
from data.decode import decode_rgb, decode_rgb_cuda
from data.index import ShardInfo, read_index
from data.order import Piece, pieces_of, seed_of
from data.reader import ReadAhead, ShardReadError, eval_range, read_piece, sample_bytes
from data.shards import ShardFormatError
from data.storage import fs_and_root
from data.transforms import build_transform

READAHEAD_BYTES = 64 << 20  # raw sample bytes a loader worker's reader thread may hold ahead of decoding

__all__ = ["ShardStream", "build_loader", "CorruptDataError", "ShardReadError", "Piece", "pieces_of", "read_piece",
           "rank_range"]


# -- the order: pure functions of the index and the arguments -------------------------------------------

def epoch_shards(shards: list[ShardInfo], train: bool, seed: int, epoch: int) -> list[ShardInfo]:
    """Shard order of an epoch: shuffled with Random(seed + epoch) for training, index order otherwise."""
    shards = list(shards)
    if train:
        random.Random(seed + epoch).shuffle(shards)
    return shards


def rank_range(total: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """(start, size) of a rank's contiguous range: Q = N // world_size each for training (remainder dropped);
    sizes differing by at most one and covering all N for evaluation."""
    if train:
        quota = total // world_size
        return rank * quota, quota
    return eval_range(total, rank, world_size)


def rank_batches(size: int, batch_size: int, train: bool) -> list[int]:
    """Sizes of the rank's batches: full ones only for training, a partial last one allowed for evaluation."""
    full, rest = divmod(size, batch_size)
    return [batch_size] * full + ([rest] if rest and not train else [])


def loader_worker_chunk(batches: list[int], loader_worker: int, loader_workers: int) -> tuple[int, list[int]]:
    """(offset in the rank's range, its batch sizes) of a loader worker: batches b % L == loader_worker, chunks in
    loader-worker order."""
    offset = sum(sum(batches[w::loader_workers]) for w in range(loader_worker))
    return offset, batches[loader_worker::loader_workers]


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle: hold `size` items, emit a random one as each new item arrives."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _read_all(url: str, pieces: list[Piece]) -> Iterator[tuple[tuple, int]]:
    fs, root = fs_and_root(url)
    for piece in pieces:
        for item in read_piece(fs, root, url, piece):
            yield item, sample_bytes(item)


# -- the dataset -----------------------------------------------------------------------------------------------

class ShardStream(IterableDataset):
    """One rank's stream of batches over a split; see the module docstring for the order and its guarantees.

    Yields {"image": uint8 [b, 3, H, W], "label": int64 [b], "key": list[str], "corrupt": list[str]}.
    Iterated by a DataLoader(batch_size=None, num_workers=num_workers), or directly (then the loader workers'
    streams are interleaved in-process, giving the same sequence). `num_workers` is the loader-worker count (the
    DataLoader's name for it).
    """

    def __init__(self, url: str, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1, train: bool,
                 transform: Callable[[torch.Tensor], torch.Tensor], seed: int = 0, shuffle_buffer: int = 2000,
                 epoch: int = 0, start_batch: int = 0, num_workers: int = 0, max_corrupt_fraction: float = 0.01,
                 image_size: int | None = None, decode_device: str = "cpu", readahead_bytes: int = READAHEAD_BYTES):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"start_batch={start_batch}, num_workers={num_workers}: need batch_size >= 1, "
                             "0 <= rank < world_size, start_batch >= 0, num_workers >= 0")
        if decode_device != "cpu" and num_workers > 0:
            raise ValueError(f"decode_device={decode_device!r} needs num_workers=0 (CUDA cannot be used in forked "
                             "DataLoader workers)")
        self.url, self.split = url.rstrip("/"), split
        self.index = read_index(self.url)
        self.shards = self.index.split(split, self.url).shards
        self.batch_size, self.rank, self.world_size, self.train = batch_size, rank, world_size, train
        self.transform, self.seed, self.shuffle_buffer = transform, seed, shuffle_buffer
        self.epoch, self.start_batch, self.num_workers = epoch, start_batch, num_workers
        self.max_corrupt_fraction, self.image_size = max_corrupt_fraction, image_size
        self.decode_device, self.readahead_bytes = decode_device, readahead_bytes
        total = self.index.splits[split].samples
        if train and total // world_size // batch_size == 0:
            raise ValueError(f"{self.url}: split {split!r} has {total} samples, fewer than world_size x batch_size = "
                             f"{world_size} x {batch_size}; training would yield no batch")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def loader_workers(self) -> int:
        return max(1, self.num_workers)

    def _batches(self) -> tuple[int, list[int]]:
        start, size = rank_range(self.index.splits[self.split].samples, self.rank, self.world_size, self.train)
        return start, rank_batches(size, self.batch_size, self.train)

    def __len__(self) -> int:
        return max(0, len(self._batches()[1]) - self.start_batch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.loader_workers:
                raise ValueError(f"ShardStream(num_workers={self.num_workers}) iterated by a DataLoader with "
                                 f"{info.num_workers} loader workers; pass the same number to both (build_loader does)")
            # The DataLoader asks loader worker 0 first; on a resume the first batch (start_batch) belongs
            # to logical loader worker start_batch % L, so the loader's worker ids are rotated by start_batch.
            yield from self._loader_worker_batches((info.id + self.start_batch) % self.loader_workers)
            return
        streams = [self._loader_worker_batches(w) for w in range(self.loader_workers)]
        try:
            for b in range(self.start_batch, len(self._batches()[1])):
                yield next(streams[b % self.loader_workers])
        finally:
            for s in streams:
                s.close()

    def _loader_worker_batches(self, loader_worker: int) -> Iterator[dict]:
        rank_start, batches = self._batches()
        offset, mine = loader_worker_chunk(batches, loader_worker, self.loader_workers)
        start = rank_start + offset
        pieces = pieces_of(epoch_shards(self.shards, self.train, self.seed, self.epoch), start, start + sum(mine))
        reader = ReadAhead(lambda: _read_all(self.url, pieces), self.readahead_bytes)
        items: Iterator = iter(reader)
        if self.train and self.shuffle_buffer > 1:
            items = shuffle_buffer(items, self.shuffle_buffer,
                                   random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{loader_worker}"))
        skip = len(range(loader_worker, self.start_batch, self.loader_workers))
        maker = BatchMaker(DecodeThen(self.transform, self._decode), self.image_size, self.max_corrupt_fraction,
                           f"{self.url} (split {self.split!r}, rank {self.rank})")
        try:
            for j, size in enumerate(mine):
                raw = [item for _, item in zip(range(size), items)]
                if len(raw) < size:
                    raise ShardFormatError(f"{self.url}: split {self.split!r} ran out of samples ({len(raw)} of "
                                           f"{size} for a batch); the shards hold fewer samples than _index.json says")
                if j < skip:
                    continue  # resuming: dropped before decoding, after the shuffle buffer
                # Augmentation randomness is a function of the batch's position: identical after a resume.
                batch = maker.make(raw, seed_of(self.seed, self.epoch, self.rank,
                                                loader_worker + j * self.loader_workers))
                if j == len(mine) - 1:
                    maker.check_all_corrupt()  # a small set in which every image was corrupt
                yield batch
        finally:
            reader.close()

    def _decode(self, data: bytes, key: str) -> torch.Tensor:
        if self.decode_device == "cpu":
            return decode_rgb(data, key)
        return decode_rgb_cuda(data, key, self.decode_device)


def build_loader(url: str, split: str, *, batch_size: int, rank: int, world_size: int, train: bool, image_size: int,
                 num_workers: int, seed: int, epoch: int, start_batch: int = 0, shuffle_buffer: int = 2000,
                 auto_augment: str | None = None, max_corrupt_fraction: float = 0.01, prefetch_factor: int = 4,
                 decode_device: str = "cpu", pin_memory: bool | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0)) -> DataLoader:
    """A DataLoader(batch_size=None) over a ShardStream with the training or evaluation transform preset.

    Yields uint8 batches; apply `data.transforms.normalize` on the training device. `decode_device="cuda"`
    decodes JPEGs with nvJPEG (needs num_workers=0); `crop_scale` is RandomResizedCrop's area range.
    """
    stream = ShardStream(url, split, batch_size=batch_size, rank=rank, world_size=world_size, train=train,
                         transform=build_transform(train, image_size, auto_augment, crop_scale), seed=seed,
                         shuffle_buffer=shuffle_buffer, epoch=epoch, start_batch=start_batch,
                         num_workers=num_workers, max_corrupt_fraction=max_corrupt_fraction, image_size=image_size,
                         decode_device=decode_device)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and decode_device == "cpu"
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None)
