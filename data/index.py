"""The shard folder's index `{root}/_index.json`, the only file that makes a folder a dataset: classes, and per split
the shards with their sample counts, byte sizes and sha256. Readers trust only shards listed here.

Layout of a shard folder (CONTRACTS.md): shards at `{root}/{split}/{split}-NNNNNN.tar`; everything else under a name
that starts with `_`, which Ray Data and pyarrow skip when they list a folder: the index at `_index.json`, per-shard
sidecars at `_meta/{shard name}.json`, the list of undecodable sources at `_meta/bad_files.json`. The helpers below
build these paths; nothing else spells them.

The index has an identity (a sha256 of its content, also stored under "identity"): `jobs.prepare` replaces the
index by an atomic move, never by delete-then-write, and a long-running reader calls `check_index_unchanged` at
epoch boundaries to stop with a clear error rather than mix two datasets. Reads retry transient storage errors.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from data.storage import fs_and_root, retry

INDEX_NAME = "_index.json"
LEGACY_INDEX_NAME = "index.json"  # written by versions before the `_`-prefixed layout
META_DIR = "_meta"
BAD_FILES_NAME = "bad_files.json"
INDEX_FORMAT = "imagenet-ray-shards/2"



class ShardIndexError(ValueError):
    """The index is missing, malformed or of an older layout; the message names the URL and the key."""


class IndexChangedError(ShardIndexError):
    """The index changed under a running reader (jobs.prepare was re-run into its folder)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # path relative to the dataset root, e.g. "train/train-000000.tar"
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitIndex:
    shards: list[ShardInfo]
    samples: int
    bad_files: int = 0


@dataclass(frozen=True)
class DatasetIndex:
    classes: list[str]  # wnids; class index = position
    class_names: list[str]
    splits: dict[str, SplitIndex]
    bad_files: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: source URL, seed, shard size, encoding, reports

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.splits.values())

    def split(self, name: str, url: str = "") -> SplitIndex:
        if name not in self.splits:
            raise ShardIndexError(f"{index_url(url)}: no split {name!r}; present: {', '.join(self.splits) or 'none'}")
        return self.splits[name]

    def _content(self) -> dict:
        return {"format": INDEX_FORMAT, "classes": self.classes, "class_names": self.class_names,
                "splits": {k: {"shards": [asdict(s) for s in v.shards], "samples": v.samples,
                               "bad_files": v.bad_files} for k, v in self.splits.items()},
                "total_samples": self.total_samples, "bad_files": self.bad_files, **self.extra}

    @property
    def identity(self) -> str:
        """sha256 of the whole index's content: equal for equal content, whoever wrote it and when."""
        return _digest(self._content())

    def split_identity(self, split: str) -> str:
        """sha256 of what defines one split's data (classes and that split's shards): what a reader of it needs."""
        return _digest({"classes": self.classes, "split": split, "shards": [asdict(s) for s in self.split(split).shards]})

    def to_json(self) -> dict:
        return {**self._content(), "identity": self.identity}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _root(url: str) -> str:
    return url.rstrip("/")


def index_url(root: str) -> str:
    return f"{_root(root)}/{INDEX_NAME}"


def sidecar_url(root: str, shard_name: str) -> str:
    """`{root}/_meta/{shard name}.json`, e.g. `_meta/train/train-000000.tar.json`."""
    return f"{_root(root)}/{META_DIR}/{shard_name}.json"


def bad_files_url(root: str) -> str:
    return f"{_root(root)}/{META_DIR}/{BAD_FILES_NAME}"


def _require(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ShardIndexError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = getattr(kind, "__name__", kind)
        raise ShardIndexError(f"{where}: key {key!r} is {type(value).__name__}; expected {expected}")
    return value


def _parse_split(body: dict, at: str) -> SplitIndex:
    shards = []
    for i, s in enumerate(_require(body, "shards", list, at)):
        sat = f"{at}.shards[{i}]"
        shards.append(ShardInfo(_require(s, "name", str, sat), _require(s, "samples", int, sat),
                                _require(s, "bytes", int, sat), _require(s, "sha256", str, sat)))
    samples = _require(body, "samples", int, at)
    if samples != sum(s.samples for s in shards):
        raise ShardIndexError(f"{at}.samples = {samples} but its shards hold {sum(s.samples for s in shards)}")
    return SplitIndex(shards, samples, int(body.get("bad_files", 0)))


def parse_index(data: dict, where: str) -> DatasetIndex:
    if _require(data, "format", str, where) != INDEX_FORMAT:
        raise ShardIndexError(f"{where}: format {data['format']!r}; this reader understands {INDEX_FORMAT!r} "
                              "(re-run `python -m jobs.prepare` into a new folder)")
    classes = _require(data, "classes", list, where)
    names = _require(data, "class_names", list, where)
    if len(names) != len(classes) or not all(isinstance(c, str) for c in classes + names):
        raise ShardIndexError(f"{where}: 'classes' and 'class_names' must be lists of strings of equal length")
    splits = {split: _parse_split(body, f"{where}: splits.{split}")
              for split, body in _require(data, "splits", dict, where).items()}
    known = {"format", "classes", "class_names", "splits", "total_samples", "bad_files", "identity"}
    return DatasetIndex(classes, names, splits, int(data.get("bad_files", 0)),
                        {k: v for k, v in data.items() if k not in known})


def _legacy_error(url: str) -> ShardIndexError:
    return ShardIndexError(
        f"{_root(url)}/{LEGACY_INDEX_NAME}: a shard folder written by an older version of jobs.prepare (index.json "
        f"and *.done.json sidecars beside the shards); this version reads {INDEX_NAME} with sidecars under "
        f"{META_DIR}/. Re-run `python -m jobs.prepare --src ... --dst NEW_FOLDER` into a new folder")


def read_index(url: str) -> DatasetIndex:
    """Read `{url}/_index.json` (retrying transient errors); a missing, old-layout or malformed index raises an
    error naming the URL and key."""
    where = index_url(url)
    fs, root = fs_and_root(url)
    try:
        raw = retry(lambda: fs.cat_file(f"{root}/{INDEX_NAME}"), f"reading {where}")
    except FileNotFoundError:
        if retry(lambda: fs.exists(f"{root}/{LEGACY_INDEX_NAME}"), f"looking for {_root(url)}/{LEGACY_INDEX_NAME}"):
            raise _legacy_error(url) from None
        raise ShardIndexError(f"{where}: not found; run `python -m jobs.prepare --src ... --dst {_root(url)}` first "
                              "(the index is written last, after every shard)") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"{where}: not valid JSON ({e})") from e
    return parse_index(data, where)


def check_index_unchanged(url: str, index: DatasetIndex, split: str | None = None) -> None:
    """Raise IndexChangedError when `{url}/_index.json` no longer matches `index` (the whole index, or only what
    defines `split`). A long-running reader calls this at epoch boundaries; one read of a small file."""
    def identity(ix: DatasetIndex) -> str:
        return ix.split_identity(split) if split else ix.identity

    try:
        current = read_index(url)
        before, now = identity(index), identity(current)
    except ShardIndexError as e:
        if isinstance(e, IndexChangedError):
            raise
        raise IndexChangedError(f"{index_url(url)} changed under a running job and no longer reads as its index "
                                f"({e}); stop and restart the job on a complete dataset") from e
    if before != now:
        what = f"split {split!r}" if split else "the index"
        raise IndexChangedError(
            f"{index_url(url)}: {what} changed under a running job (identity {before[:12]} at start, {now[:12]} "
            "now): `jobs.prepare` was re-run into this folder. The job stops rather than mix two datasets; restart "
            "it (from its checkpoint) to train on the new index")


# -- per-shard byte offsets -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardOffsets:
    """Byte offset of each sample's first tar header, in sample order, and of the end-of-archive marker."""

    starts: tuple[int, ...]
    end: int

    def byte_range(self, first: int, stop: int) -> tuple[int, int]:
        """[start, end) of the bytes holding samples [first, stop) of the shard."""
        return self.starts[first], self.starts[stop] if stop < len(self.starts) else self.end


def read_shard_offsets(fs, root: str, name: str, samples: int) -> ShardOffsets | None:
    """The offsets prepare stored in the sidecar of shard `name`; None when it has none (an older prepare).

    `sidecar_url` is the only place that knows where sidecars live.
    A sidecar whose offsets disagree with the index's sample count raises ShardIndexError naming it.
    """
    where = sidecar_url(root, name)
    try:
        meta = json.loads(fs.cat_file(where))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"{where}: not valid JSON ({e}); re-run jobs.prepare") from e
    if not isinstance(meta, dict) or "offsets" not in meta:
        return None
    starts, end = meta["offsets"], meta.get("end")
    if (not isinstance(starts, list) or len(starts) != samples or not isinstance(end, int)
            or not all(isinstance(x, int) for x in starts) or any(b <= a for a, b in zip(starts, starts[1:] + [end]))):
        raise ShardIndexError(f"{where}: 'offsets' must be {samples} increasing byte offsets (_index.json's count) "
                              f"followed by an 'end' offset; re-run jobs.prepare")
    return ShardOffsets(tuple(starts), end)


def write_json_atomic(fs, path: str, obj: Any) -> None:
    """Write JSON under a unique temporary name, then move it over `path`: readers see the old or the new file,
    never half a file and never no file (no delete first; S3 and local renames replace in one step)."""
    folder, _, base = path.rpartition("/")
    tmp = f"{folder}/_{base}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False).encode())
    fs.mv(tmp, path)


def write_index(url: str, index: DatasetIndex) -> None:
    fs, root = fs_and_root(url)
    fs.makedirs(root, exist_ok=True)
    write_json_atomic(fs, f"{root}/{INDEX_NAME}", index.to_json())
