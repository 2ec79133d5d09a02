"""The shard index `{root}/index.json` that `jobs.prepare` writes last: classes, and per split the shards with
their sample counts, byte sizes and sha256. Readers trust only shards listed here."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

INDEX_NAME = "index.json"
INDEX_FORMAT = "imagenet-ray-shards/1"


class ShardIndexError(ValueError):
    """index.json is missing or malformed; the message names the URL and the key."""


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
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: source URL, seed, shard size, reports

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.splits.values())

    def split(self, name: str, url: str = "") -> SplitIndex:
        if name not in self.splits:
            raise ShardIndexError(f"{url}/{INDEX_NAME}: no split {name!r}; present: {', '.join(self.splits) or 'none'}")
        return self.splits[name]

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "classes": self.classes, "class_names": self.class_names,
                "splits": {k: {"shards": [asdict(s) for s in v.shards], "samples": v.samples,
                               "bad_files": v.bad_files} for k, v in self.splits.items()},
                "total_samples": self.total_samples, "bad_files": self.bad_files, **self.extra}


def index_url(url: str) -> str:
    return f"{url.rstrip('/')}/{INDEX_NAME}"


def _require(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ShardIndexError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = getattr(kind, "__name__", kind)
        raise ShardIndexError(f"{where}: key {key!r} is {type(value).__name__}; expected {expected}")
    return value


def parse_index(data: dict, where: str) -> DatasetIndex:
    if _require(data, "format", str, where) != INDEX_FORMAT:
        raise ShardIndexError(f"{where}: format {data['format']!r}; this reader understands {INDEX_FORMAT!r}")
    classes = _require(data, "classes", list, where)
    names = _require(data, "class_names", list, where)
    if len(names) != len(classes) or not all(isinstance(c, str) for c in classes + names):
        raise ShardIndexError(f"{where}: 'classes' and 'class_names' must be lists of strings of equal length")
    splits = {}
    for split, body in _require(data, "splits", dict, where).items():
        at = f"{where}: splits.{split}"
        shards = []
        for i, s in enumerate(_require(body, "shards", list, at)):
            sat = f"{at}.shards[{i}]"
            shards.append(ShardInfo(_require(s, "name", str, sat), _require(s, "samples", int, sat),
                                    _require(s, "bytes", int, sat), _require(s, "sha256", str, sat)))
        samples = _require(body, "samples", int, at)
        if samples != sum(s.samples for s in shards):
            raise ShardIndexError(f"{at}.samples = {samples} but its shards hold {sum(s.samples for s in shards)}")
        splits[split] = SplitIndex(shards, samples, int(body.get("bad_files", 0)))
    known = {"format", "classes", "class_names", "splits", "total_samples", "bad_files"}
    return DatasetIndex(classes, names, splits, int(data.get("bad_files", 0)),
                        {k: v for k, v in data.items() if k not in known})


def read_index(url: str) -> DatasetIndex:
    """Read `{url}/index.json`; a missing or malformed index raises an error naming the URL and key."""
    where = index_url(url)
    try:
        with fsspec.open(where, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ShardIndexError(f"{where}: not found; run `python -m jobs.prepare --src ... --dst {url}` first "
                          "(the index is written last, after every shard)") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"{where}: not valid JSON ({e})") from e
    return parse_index(data, where)


# -- per-shard byte offsets -------------------------------------------------------------------------------------

SIDECAR_SUFFIX = ".done.json"  # where data/prepare.py writes a shard's sidecar today (its DONE_SUFFIX)


def sidecar_url(root: str, name: str) -> str:
    """The sidecar of shard `name` (relative to the dataset root `root`)."""
    return f"{root.rstrip('/')}/{name}{SIDECAR_SUFFIX}"


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

    With `sidecar_url`, the only place that knows where sidecars live (they move to `_meta/` with issue 12).
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
        raise ShardIndexError(f"{where}: 'offsets' must be {samples} increasing byte offsets (index.json's count) "
                              f"followed by an 'end' offset; re-run jobs.prepare")
    return ShardOffsets(tuple(starts), end)


def write_json_atomic(fs, path: str, obj: Any) -> None:
    """Write JSON to a temporary name, then move it into place (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False).encode())
    fs.mv(tmp, path)


def write_index(url: str, index: DatasetIndex) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    write_json_atomic(fs, f"{root.rstrip('/')}/{INDEX_NAME}", index.to_json())
