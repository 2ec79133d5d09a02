"""Streaming dataset over the tar shards of `jobs.prepare`, through fsspec (local, s3://, gs://, ...).

Order, designed so that resuming mid-epoch is exact with any number of loader workers:

- Training: the epoch's order is the shard list shuffled with `Random(seed + epoch)`, concatenated (sample
  counts come from index.json, nothing is read). Each rank takes Q = N // world_size contiguous samples
  (the remainder is dropped this epoch, like DistributedSampler(drop_last=True)) and yields Q // batch_size
  full batches: the same count on every rank, so DDP never waits on a rank that ran out (webdataset#188).
- The rank's batches are spread over W = max(1, num_workers) loader workers: batch b comes from worker
  b % W, and worker w reads a contiguous chunk of the rank's range (chunks in worker order), shuffles it
  with a buffer seeded by (seed, epoch, rank, w), and cuts it into batches. The DataLoader's in-order
  round robin then yields batch b of the rank's sequence as output b.
- Resume at `start_batch=k`: each worker drops its batches before k after the shuffle buffer and before
  decoding, so batches k.. are identical to an uninterrupted epoch (the DataLoader starts its round robin
  at loader worker 0, so loader worker i plays logical worker (i + k) % W). Augmentation draws from a torch RNG
  seeded per batch from (seed, epoch, rank, b), so the pixels match too.
- Evaluation: no shuffle, nothing dropped or duplicated: rank ranges differ in size by at most one and the
  last batch may be partial. Test samples (no labels) get label -1.

I/O: a background thread per worker reads the worker's shard pieces in order into a byte-bounded buffer
(`readahead_bytes`, 64 MiB by default), so the next shard is being fetched while the current one is decoded.
Files are opened with an 8 MiB read-ahead block (ranged GETs on object stores) and members a worker does not
need are seeked past, not read. A failed read is retried with exponential backoff from the last sample
boundary, then fails naming the shard. A shard's byte size is checked against the index before use (full
sha256 checks: `data.shards.verify_shards`). Unsafe tar members are refused (`data.shards`).

Corrupt images are skipped and reported in the batch's "corrupt" list (the batch is smaller; no extra
samples are pulled, so step counts stay equal). If more than `max_corrupt_fraction` of the samples a worker
decoded were corrupt (after 50 samples; or all of them, in a smaller set), it raises `CorruptDataError`.
"""
from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.decode import CorruptImageError, decode_rgb, decode_rgb_cuda
from data.index import ShardInfo, read_index
from data.shards import ShardFormatError, ShardIntegrityError, read_samples
from data.transforms import build_transform

READ_BLOCK = 8 << 20  # fsspec block size: one ranged GET per 8 MiB on object stores
READAHEAD_BYTES = 64 << 20  # raw sample bytes a worker's reader thread may hold ahead of decoding
READ_ATTEMPTS = 4  # per shard piece, reset after each sample read successfully
RETRY_BASE_S = 0.5  # backoff: 0.5 s, 1 s, 2 s
MIN_SAMPLES_FOR_CORRUPT_CHECK = 50
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EXAMPLES = 5


class CorruptDataError(RuntimeError):
    """Too many images of a shard stream failed to decode."""


class ShardReadError(OSError):
    """A shard could not be read after retries."""


@dataclass(frozen=True)
class Piece:
    """A contiguous run of samples [start, start + count) of one shard."""

    name: str
    bytes: int
    start: int
    count: int


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
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def rank_batches(size: int, batch_size: int, train: bool) -> list[int]:
    """Sizes of the rank's batches: full ones only for training, a partial last one allowed for evaluation."""
    full, rest = divmod(size, batch_size)
    return [batch_size] * full + ([rest] if rest and not train else [])


def worker_chunk(batches: list[int], worker: int, num_workers: int) -> tuple[int, list[int]]:
    """(offset in the rank's range, its batch sizes) of a worker: batches b % W == worker, chunks in worker order."""
    offset = sum(sum(batches[w::num_workers]) for w in range(worker))
    return offset, batches[worker::num_workers]


def pieces_of(shards: list[ShardInfo], start: int, stop: int) -> list[Piece]:
    """The shard pieces covering [start, stop) of the concatenated shard sequence."""
    out, base = [], 0
    for s in shards:
        lo, hi = max(start, base), min(stop, base + s.samples)
        if lo < hi:
            out.append(Piece(s.name, s.bytes, lo - base, hi - lo))
        base += s.samples
        if base >= stop:
            break
    return out


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


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


# -- reading ------------------------------------------------------------------------------------------------

def _open_shard(fs, path: str):
    """Open a shard for sequential reading with large read-ahead blocks (a seam for fault-injection tests)."""
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")


def read_piece(fs, root: str, url: str, piece: Piece) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """Yield (key, shard URL, members) of a piece, retrying transient errors from the last sample boundary."""
    shard_url, path = f"{url}/{piece.name}", f"{root}/{piece.name}"
    stop = piece.start + piece.count
    next_index, offset, offset_index, attempt, size_checked = piece.start, 0, 0, 0, False
    while next_index < stop:
        try:
            if not size_checked:
                size = fs.size(path)
                if size != piece.bytes:
                    raise ShardIntegrityError(f"{shard_url}: {size} bytes, index.json says {piece.bytes}; the shard "
                                              "was changed or truncated (re-run jobs.prepare)")
                size_checked = True
            with _open_shard(fs, path) as f:
                for index, start, key, members in read_samples(f, shard_url, offset=offset, first_index=offset_index,
                                                               skip_until=next_index, stop_at=stop):
                    offset, offset_index = start, index
                    if members is None:
                        continue
                    yield key, shard_url, members
                    next_index, attempt = index + 1, 0
            if next_index < stop:
                raise ShardFormatError(f"{shard_url}: ends after {next_index} samples; index.json says it holds "
                                       f"at least {stop}")
        except (ShardFormatError, ShardIntegrityError):
            raise
        except (FileNotFoundError, PermissionError) as e:
            raise ShardReadError(f"{shard_url}: {type(e).__name__}: {e}") from e
        except Exception as e:  # network and storage hiccups: back off, reopen, continue at the boundary
            attempt += 1
            if attempt >= READ_ATTEMPTS:
                raise ShardReadError(f"{shard_url}: read failed {attempt} times in a row, last: "
                                     f"{type(e).__name__}: {e}") from e
            time.sleep(RETRY_BASE_S * 2 ** (attempt - 1))


class _Reader:
    """A thread that reads pieces in order into a buffer bounded in bytes; iterate to consume."""

    _END = object()

    def __init__(self, url: str, pieces: list[Piece], max_bytes: int) -> None:
        self.url, self.pieces, self.max_bytes = url, pieces, max_bytes
        self.items: deque = deque()
        self.held = 0
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="shard-reader", daemon=True)

    def _put(self, item, nbytes: int) -> bool:
        with self.cv:
            while self.items and self.held + nbytes > self.max_bytes and not self.closed:
                self.cv.wait()
            if self.closed:
                return False
            self.items.append((item, nbytes))
            self.held += nbytes
            self.cv.notify_all()
            return True

    def _run(self) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(self.url)
            root = root.rstrip("/")
            for piece in self.pieces:
                for item in read_piece(fs, root, self.url, piece):
                    if not self._put(item, sum(len(v) for v in item[2].values())):
                        return
            self._put(self._END, 0)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e, 0)

    def __iter__(self):
        self.thread.start()
        try:
            while True:
                with self.cv:
                    while not self.items:
                        self.cv.wait()
                    item, nbytes = self.items.popleft()
                    self.held -= nbytes
                    self.cv.notify_all()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.items.clear()
            self.cv.notify_all()


# -- the dataset -----------------------------------------------------------------------------------------------

class ShardStream(IterableDataset):
    """One rank's stream of batches over a split; see the module docstring for the order and its guarantees.

    Yields {"image": uint8 [b, 3, H, W], "label": int64 [b], "key": list[str], "corrupt": list[str]}.
    Iterated by a DataLoader(batch_size=None, num_workers=num_workers), or directly (then the workers'
    streams are interleaved in-process, giving the same sequence).
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
    def workers(self) -> int:
        return max(1, self.num_workers)

    def _batches(self) -> tuple[int, list[int]]:
        start, size = rank_range(self.index.splits[self.split].samples, self.rank, self.world_size, self.train)
        return start, rank_batches(size, self.batch_size, self.train)

    def __len__(self) -> int:
        return max(0, len(self._batches()[1]) - self.start_batch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.workers:
                raise ValueError(f"ShardStream(num_workers={self.num_workers}) iterated by a DataLoader with "
                                 f"{info.num_workers} workers; pass the same number to both (build_loader does)")
            # The DataLoader asks loader worker 0 first; on a resume the first batch (start_batch) belongs
            # to logical worker start_batch % W, so the loader's worker ids are rotated by start_batch.
            yield from self._worker_batches((info.id + self.start_batch) % self.workers)
            return
        streams = [self._worker_batches(w) for w in range(self.workers)]
        try:
            for b in range(self.start_batch, len(self._batches()[1])):
                yield next(streams[b % self.workers])
        finally:
            for s in streams:
                s.close()

    def _worker_batches(self, worker: int) -> Iterator[dict]:
        rank_start, batches = self._batches()
        offset, mine = worker_chunk(batches, worker, self.workers)
        start = rank_start + offset
        shards = epoch_shards(self.shards, self.train, self.seed, self.epoch)
        items: Iterator = iter(_Reader(self.url, pieces_of(shards, start, start + sum(mine)), self.readahead_bytes))
        if self.train and self.shuffle_buffer > 1:
            items = shuffle_buffer(items, self.shuffle_buffer,
                                   random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}"))
        skip = len(range(worker, self.start_batch, self.workers))
        stats = {"seen": 0, "corrupt": 0, "examples": []}
        try:
            for j, size in enumerate(mine):
                raw = [item for _, item in zip(range(size), items)]
                if len(raw) < size:
                    raise ShardFormatError(f"{self.url}: split {self.split!r} ran out of samples ({len(raw)} of "
                                           f"{size} for a batch); the shards hold fewer samples than index.json says")
                if j < skip:
                    continue  # resuming: dropped before decoding, after the shuffle buffer
                batch = self._make_batch(raw, worker + j * self.workers, stats)
                if j == len(mine) - 1 and stats["corrupt"] == stats["seen"] > 0:
                    self._corrupt_error(stats)  # a small set in which every image was corrupt
                yield batch
        finally:
            if hasattr(items, "close"):
                items.close()

    def _decode(self, data: bytes, key: str) -> torch.Tensor:
        if self.decode_device == "cpu":
            return decode_rgb(data, key)
        return decode_rgb_cuda(data, key, self.decode_device)

    def _make_batch(self, raw: list[tuple[str, str, dict[str, bytes]]], batch: int, stats: dict) -> dict:
        images, labels, keys, corrupt = [], [], [], []
        # Augmentation randomness is a function of the batch's position: identical after a resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(self.seed, self.epoch, self.rank, batch))
            for key, shard_url, members in raw:
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                if ext is None:
                    raise ShardFormatError(f"{shard_url}: sample {key!r} has no image member "
                                           f"(members: {', '.join(sorted(members))})")
                try:
                    image = self._decode(members[ext], key)
                except CorruptImageError as e:
                    corrupt.append(key)
                    if len(stats["examples"]) < EXAMPLES:
                        stats["examples"].append(f"{key} in {shard_url} ({e.reason})")
                    continue
                images.append(self.transform(image))
                labels.append(self._label(members, key, shard_url))
                keys.append(key)
        stats["seen"] += len(raw)
        stats["corrupt"] += len(corrupt)
        if (stats["seen"] >= MIN_SAMPLES_FOR_CORRUPT_CHECK
                and stats["corrupt"] > self.max_corrupt_fraction * stats["seen"]):
            self._corrupt_error(stats)
        if images:
            image_batch = torch.stack(images)
        else:
            side = self.image_size or 0
            image_batch = torch.empty((0, 3, side, side), dtype=torch.uint8)
        return {"image": image_batch, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                "corrupt": corrupt}

    @staticmethod
    def _label(members: dict[str, bytes], key: str, shard_url: str) -> int:
        if "cls" not in members:
            return -1
        try:
            return int(members["cls"])
        except ValueError:
            raise ShardFormatError(f"{shard_url}: sample {key!r} has class {members['cls'][:20]!r}, "
                                   "not an integer") from None

    def _corrupt_error(self, stats: dict) -> None:
        raise CorruptDataError(
            f"{stats['corrupt']} of {stats['seen']} images decoded by one loader worker of {self.url} "
            f"(split {self.split!r}, rank {self.rank}) were corrupt, more than max_corrupt_fraction="
            f"{self.max_corrupt_fraction}; examples: {'; '.join(stats['examples'])}. "
            "Run data.shards.verify_shards and re-run jobs.prepare, or raise max_corrupt_fraction.")


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
