"""Reading samples out of tar shards over fsspec: ranged reads of sample runs through the per-sample byte offsets
(training windows), a sequential piece reader (evaluation and raw access), and a byte-bounded read-ahead thread.

Storage calls follow the package's one retry policy (`data.storage`: `retry` for single calls; the sequential
reader uses the same attempts and backoff, counted again after each sample it reads). A shard's byte size is
checked against the index before its first use; unsafe tar members are refused (`data.shards`).
"""
from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from data.index import ShardOffsets, read_index, read_shard_offsets
from data.order import Piece, pieces_of
from data.shards import ShardFormatError, ShardIntegrityError, read_samples, scan_offsets
from data.storage import ATTEMPTS, StorageError, backoff_s, fs_and_root, retry

READ_BLOCK = 8 << 20  # sequential reads: fsspec block size, one ranged GET per 8 MiB on object stores
END_BLOCK = b"\0" * 512  # appended to a byte range so the tar parser finds an end after its last sample
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

RawSample = tuple[str, str, dict[str, bytes]]  # (key, shard URL, members by extension)


class ShardReadError(StorageError):
    """A shard could not be read (missing, or failed after retries); the message names it."""


@dataclass
class ReadStats:
    """What a reader asked of storage: requests (size checks, sidecars, ranges), payload bytes, samples."""

    requests: int = 0
    bytes: int = 0
    samples: int = 0
    offset_scans: int = 0  # shards without stored offsets, whose headers were read to find them

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class RangeReader:
    """Reads runs of samples of shards under `url` as one ranged read each (`fs.cat_file(path, start, end)`).

    Offsets come from each shard's sidecar (`data.index.read_shard_offsets`); for a shard without them the
    headers are scanned once. The last `cache_shards` shards' offsets are kept.
    """

    def __init__(self, url: str, cache_shards: int = 64) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fs_and_root(self.url)
        self.cache_shards = cache_shards
        self.stats = ReadStats()
        self._offsets: OrderedDict[str, ShardOffsets] = OrderedDict()

    def _call(self, fn: Callable, what: str):
        self.stats.requests += 1
        return retry(fn, what, error=ShardReadError)

    def offsets(self, piece: Piece, samples: int) -> ShardOffsets:
        """The shard's offsets (cached); on first use its size is checked against the index."""
        if piece.name in self._offsets:
            self._offsets.move_to_end(piece.name)
            return self._offsets[piece.name]
        path, shard_url = f"{self.root}/{piece.name}", f"{self.url}/{piece.name}"
        try:
            size = self._call(lambda: self.fs.size(path), shard_url)
            if size != piece.bytes:
                raise ShardIntegrityError(f"{shard_url}: {size} bytes, _index.json says {piece.bytes}; the shard "
                                          "was changed or truncated (re-run jobs.prepare)")
            offs = self._call(lambda: read_shard_offsets(self.fs, self.root, piece.name, samples), shard_url)
            if offs is None:
                self.stats.offset_scans += 1
                offs = self._call(lambda: self._scan(path, shard_url), shard_url)
        except (FileNotFoundError, PermissionError) as e:
            raise ShardReadError(f"{shard_url}: {type(e).__name__}: {e}") from e
        if len(offs.starts) != samples:
            raise ShardFormatError(f"{shard_url}: holds {len(offs.starts)} samples; _index.json says {samples}")
        self._offsets[piece.name] = offs
        while len(self._offsets) > self.cache_shards:
            self._offsets.popitem(last=False)
        return offs

    def _scan(self, path: str, shard_url: str) -> ShardOffsets:
        with self.fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead") as f:
            starts, end = scan_offsets(f, shard_url)
        return ShardOffsets(tuple(starts), end)

    def read(self, piece: Piece, shard_samples: int) -> list[RawSample]:
        """The samples of a piece, in shard order, from one ranged read."""
        offs = self.offsets(piece, shard_samples)
        start, end = offs.byte_range(piece.start, piece.start + piece.count)
        path, shard_url = f"{self.root}/{piece.name}", f"{self.url}/{piece.name}"
        # keywords: s3fs's cat_file takes version_id second and would read the whole object
        data = self._call(lambda: self.fs.cat_file(path, start=start, end=end), f"{shard_url} bytes {start}-{end}")
        if len(data) != end - start:
            raise ShardIntegrityError(f"{shard_url}: got {len(data)} bytes of range {start}-{end}; the shard is "
                                      "shorter than its offsets say (re-run jobs.prepare)")
        self.stats.bytes += len(data)
        out = []
        for index, at, key, members in read_samples(io.BytesIO(data + END_BLOCK), shard_url,
                                                    first_index=piece.start):
            if at + start != offs.starts[index]:
                raise ShardFormatError(f"{shard_url}: sample {index} starts at byte {at + start}, its sidecar says "
                                       f"{offs.starts[index]} (re-run jobs.prepare)")
            out.append((key, shard_url, members))
        if len(out) != piece.count:
            raise ShardFormatError(f"{shard_url}: bytes {start}-{end} hold {len(out)} samples, not {piece.count}")
        self.stats.samples += len(out)
        return out


# -- sequential reading (evaluation, raw samples) -----------------------------------------------------------------

def _open_shard(fs, path: str):
    """Open a shard for sequential reading with large read-ahead blocks (a seam for fault-injection tests)."""
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")


def read_piece(fs, root: str, url: str, piece: Piece) -> Iterator[RawSample]:
    """Yield (key, shard URL, members) of a piece read front to back, retrying transient errors from the last
    sample boundary (the retry policy's attempts count again after each sample read)."""
    shard_url, path = f"{url}/{piece.name}", f"{root}/{piece.name}"
    stop = piece.start + piece.count
    next_index, offset, offset_index, attempt, size_checked = piece.start, 0, 0, 0, False
    while next_index < stop:
        try:
            if not size_checked:
                size = fs.size(path)
                if size != piece.bytes:
                    raise ShardIntegrityError(f"{shard_url}: {size} bytes, _index.json says {piece.bytes}; the shard "
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
                raise ShardFormatError(f"{shard_url}: ends after {next_index} samples; _index.json says it holds "
                                       f"at least {stop}")
        except (ShardFormatError, ShardIntegrityError):
            raise
        except (FileNotFoundError, PermissionError) as e:
            raise ShardReadError(f"{shard_url}: {type(e).__name__}: {e}") from e
        except Exception as e:  # network and storage hiccups: back off, reopen, continue at the boundary
            attempt += 1
            if attempt >= ATTEMPTS:
                raise ShardReadError(f"{shard_url}: read failed {attempt} times in a row, last: "
                                     f"{type(e).__name__}: {e}") from e
            time.sleep(backoff_s(attempt))


def eval_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """(start, size) of a rank's contiguous evaluation range: sizes differ by at most one and cover all."""
    base, extra = divmod(total, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def iter_raw_samples(url: str, split: str, rank: int = 0, world: int = 1) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of a rank's contiguous range of a split in index order, undecoded: the raw shard reader for
    evaluation code that needs more than pixels (original size, boxes in `<key>.json`)."""
    url = url.rstrip("/")
    info = read_index(url).split(split, url)
    start, size = eval_range(info.samples, rank, world)
    fs, root = fs_and_root(url)
    for piece in pieces_of(info.shards, start, start + size):
        for key, _, members in read_piece(fs, root, url, piece):
            yield key, members


class ReadAhead:
    """Runs `produce()` on a thread into a buffer bounded in bytes; iterate to consume, `close()` to stop.

    `produce` yields (item, nbytes). An exception on the thread is raised to the consumer at its place in order.
    """

    _END = object()

    def __init__(self, produce: Callable[[], Iterable[tuple[object, int]]], max_bytes: int,
                 name: str = "shard-read-ahead") -> None:
        self.produce, self.max_bytes = produce, max_bytes
        self.items: deque = deque()
        self.held = 0
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

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
            for item, nbytes in self.produce():
                if not self._put(item, nbytes):
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


def sample_bytes(sample: RawSample) -> int:
    return sum(len(v) for v in sample[2].values())
