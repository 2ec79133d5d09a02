"""WebDataset-style tar shards: a writer, a safe streaming reader, and integrity checks.

Format (WebDataset convention, webdataset.tariterators): a sample is the run of adjacent members sharing a
key (the member name up to the first dot of its last component); `<key>.jpg` holds the original image
bytes, `<key>.cls` the class index in ASCII (absent for test), `<key>.json` wnid, boxes and size. Headers are
written deterministically (mtime 0, uid 0), so the same samples give byte-identical shards.

The reader parses tar headers itself so that it can seek past members it skips (a rank or loader worker
starts mid-shard) and refuses what a training job must never unpack: absolute names, `..`, links, devices,
directories.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from typing import BinaryIO, Iterator

from data.index import DatasetIndex, read_index
from data.storage import fs_and_root

BLOCK = 512
REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
HASH_BLOCK = 8 << 20


class ShardFormatError(ValueError):
    """A shard holds a malformed or unsafe member (not retried: reading again gives the same bytes)."""


class ShardIntegrityError(ValueError):
    """A shard's size or sha256 disagrees with the index."""


class _HashingWriter:
    """File-object wrapper that counts and hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Write samples into a tar on an open binary file; `close()` returns (byte size, sha256 hex).

    It records where each sample starts: `offsets[i]` is the byte offset of sample i's first tar header and
    `end` (set by `close`) the offset of the end-of-archive marker, so a reader can fetch samples [i, j) as the
    one byte range [offsets[i], offsets[j] or end) (prepare stores both in the shard's sidecar).
    """

    def __init__(self, f: BinaryIO) -> None:
        self._out = _HashingWriter(f)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.offsets: list[int] = []
        self.end: int | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.offsets.append(self._out.size)  # tarfile writes each header and payload through at once
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> tuple[int, str]:
        self.end = self._out.size
        self._tar.close()
        return self._out.size, self._out.sha.hexdigest()


def _octal(field: bytes, shard: str, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardFormatError(f"{shard}: tar header {what} field {field!r} is not octal") from None


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _pax_records(data: bytes, shard: str) -> dict[str, str]:
    out, pos = {}, 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if length <= 0:
                raise ValueError(f"record length {length}")
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "replace")
            pos += length
    except ValueError as e:
        raise ShardFormatError(f"{shard}: malformed pax extended header ({e})") from None
    return out


def check_member_name(name: str, shard: str) -> None:
    """Refuse names that would escape an extraction directory: absolute, `..` components, empty."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ShardFormatError(f"{shard}: refused member {name!r} (absolute path or '..' component)")


def split_member_name(name: str, shard: str) -> tuple[str, str]:
    """WebDataset key/extension: the key is the name up to the first dot of its last component."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        raise ShardFormatError(f"{shard}: member {name!r} has no '<key>.<ext>' name")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _next_member(f: BinaryIO, pos: int, shard: str) -> tuple[str, int, int, int] | None:
    """Read the header(s) of the member at `pos`: (name, size, data offset, next offset), None at the end."""
    pax: dict[str, str] = {}
    longname = None
    while True:
        block = f.read(BLOCK)
        if block == b"\0" * BLOCK:
            return None
        if not block:
            raise ShardFormatError(f"{shard}: ends at byte {pos} without an end-of-archive marker (truncated)")
        if len(block) < BLOCK:
            raise ShardFormatError(f"{shard}: truncated tar header at byte {pos}")
        stored = _octal(block[148:156], shard, "checksum")
        if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise ShardFormatError(f"{shard}: bad tar header checksum at byte {pos} (not a tar or corrupted)")
        flag, size = block[156:157], _octal(block[124:136], shard, "size")
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
            name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if flag in (b"x", b"g", b"L"):
            data = f.read(_padded(size))[:size]
            if len(data) < size:
                raise ShardFormatError(f"{shard}: truncated extended header at byte {pos}")
            if flag == b"x":
                pax.update(_pax_records(data, shard))
            elif flag == b"L":
                longname = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            pos += BLOCK + _padded(size)
            continue
        name = pax.get("path") or longname or name
        size = int(pax["size"]) if "size" in pax else size
        check_member_name(name, shard)
        if flag not in REGULAR_TYPES:
            raise ShardFormatError(f"{shard}: refused member {name!r} of tar type {flag!r} (only regular files)")
        return name, size, pos + BLOCK, pos + BLOCK + _padded(size)


def read_samples(f: BinaryIO, shard: str, *, offset: int = 0, first_index: int = 0, skip_until: int = 0,
                 stop_at: int | None = None) -> Iterator[tuple[int, int, str, dict[str, bytes] | None]]:
    """Stream samples from an open shard positioned anywhere at a sample boundary `offset`.

    Yields (sample index, byte offset of its first header, key, members). Samples with index < skip_until
    come with members None: their data is seeked past, not read. Stops before index `stop_at`.
    Indices count from `first_index`, the index of the sample at `offset` (used to resume after an error).
    """
    f.seek(offset)
    pos, index = offset, first_index - 1
    key, members, start = None, {}, offset
    while stop_at is None or index < stop_at:
        member = _next_member(f, pos, shard)
        if member is None:
            break
        name, size, data_pos, next_pos = member
        mkey, ext = split_member_name(name, shard)
        if mkey != key:
            if key is not None:
                yield index, start, key, (members if index >= skip_until else None)
            index += 1
            key, members, start = mkey, {}, pos
            if stop_at is not None and index >= stop_at:
                return
        if index >= skip_until:
            f.seek(data_pos)
            data = f.read(size)
            if len(data) < size:
                raise ShardFormatError(f"{shard}: member {name!r} truncated ({len(data)} of {size} bytes)")
            members[ext] = data
        pos = next_pos
        f.seek(pos)
    if key is not None:
        yield index, start, key, (members if index >= skip_until else None)


def scan_offsets(f: BinaryIO, shard: str) -> tuple[list[int], int]:
    """What ShardWriter records (each sample's first header offset, the end-of-archive offset), recovered by
    reading the headers of an open shard and seeking past every payload (for shards without a sidecar)."""
    offsets: list[int] = []
    pos, key = 0, None
    f.seek(0)
    while (member := _next_member(f, pos, shard)) is not None:
        mkey = split_member_name(member[0], shard)[0]
        if mkey != key:
            offsets.append(pos)
            key = mkey
        pos = member[3]
        f.seek(pos)
    return offsets, pos


def file_digest(fs, path: str) -> tuple[int, str]:
    """(byte size, sha256 hex) of a stored file, read in blocks."""
    sha, size = hashlib.sha256(), 0
    with fs.open(path, "rb", block_size=HASH_BLOCK) as f:
        while chunk := f.read(HASH_BLOCK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def verify_shards(url: str, splits: list[str] | None = None, *, check_sha: bool = True,
                  raise_on_error: bool = True, index: DatasetIndex | None = None) -> dict:
    """Check every indexed shard's byte size (and sha256, which reads each shard fully) against _index.json.

    Returns {"checked": n, "problems": [...]}; raises ShardIntegrityError listing the problems unless told not to.
    """
    index = index or read_index(url)
    fs, root = fs_and_root(url)
    problems, checked = [], 0
    for split in splits or list(index.splits):
        for info in index.split(split, url).shards:
            where = f"{url.rstrip('/')}/{info.name}"
            checked += 1
            try:
                size = fs.size(f"{root}/{info.name}")
            except FileNotFoundError:
                problems.append(f"{where}: missing")
                continue
            if size != info.bytes:
                problems.append(f"{where}: {size} bytes, index says {info.bytes}")
                continue
            if check_sha and (digest := file_digest(fs, f"{root}/{info.name}")[1]) != info.sha256:
                problems.append(f"{where}: sha256 {digest}, index says {info.sha256}")
    if problems and raise_on_error:
        raise ShardIntegrityError(f"{len(problems)} of {checked} shards failed verification:\n  "
                                  + "\n  ".join(problems))
    return {"checked": checked, "problems": problems}
