"""Conversion of the Kaggle ILSVRC layout into tar shards: the work behind `python -m jobs.prepare`.

One call of `write_shard` writes one shard and is idempotent, so a job can run them as parallel tasks and
be re-run after a crash:

- a shard is written under a temporary name (`<name>.tmp-<id>`), then moved to its final name, then a
  sidecar `<name>.done.json` records its plan digest, byte size and sha256;
- a shard counts as finished only when the sidecar exists, names the same plan (same samples) and the
  final file has that size and sha256; anything else (temp names, truncated or foreign files) is redone;
- `prepare_dataset` deletes index.json first and writes it last, so readers never take a dataset whose
  shards are being rewritten as complete.

Every image is decoded with PIL before it goes in; files that fail are left out of the shards and listed in
`bad_files.json` and the index. Train samples are shuffled once with a fixed seed before sharding, so each
shard mixes classes; val and test keep sorted order.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import fsspec

from data.decode import CorruptImageError, inspect_image
from data.index import DatasetIndex, ShardInfo, SplitIndex, write_index, write_json_atomic, INDEX_NAME
from data.layout import SPLITS, ImageNetLayout, LayoutError, Sample, clip_boxes
from data.shards import ShardWriter, file_digest
from data.storage import retry

DEFAULT_SHARD_SIZE = 1000  # ~110 MB of ImageNet JPEGs: big enough to stream, small enough to spread over tasks
BAD_FILES_NAME = "bad_files.json"
DONE_SUFFIX = ".done.json"
TMP_MARK = ".tmp-"
READ_BATCH = 64  # source files fetched per request batch (concurrent on object stores)
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    name: str  # relative to the destination root, e.g. "train/train-000000.tar"
    samples: tuple[Sample, ...]
    digest: str  # sha256 of what goes in; a finished shard of another plan is redone


def _plan_digest(samples: Iterable[Sample]) -> str:
    sha = hashlib.sha256(b"imagenet-ray-shard/1\n")
    for s in samples:
        sha.update(json.dumps([s.key, s.path, s.label, [b.as_list() for b in s.boxes]]).encode() + b"\n")
    return sha.hexdigest()


def plan_shards(layout: ImageNetLayout, splits: Iterable[str], shard_size: int, seed: int) -> list[ShardPlan]:
    """Split each split's samples into shards of `shard_size` (train shuffled with `Random(seed)` first)."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}; must be >= 1")
    plans = []
    for split in splits:
        samples = list(layout.samples(split))  # sorted by key
        if split == "train":
            random.Random(seed).shuffle(samples)
        for number, start in enumerate(range(0, len(samples), shard_size)):
            chunk = tuple(samples[start:start + shard_size])
            plans.append(ShardPlan(split, number, f"{split}/{split}-{number:06d}.tar", chunk, _plan_digest(chunk)))
    return plans


def shard_done(fs, root: str, plan: ShardPlan, check_sha: bool = True) -> dict | None:
    """The sidecar of a finished, intact shard of this plan; None when it has to be (re)written."""
    final = f"{root}/{plan.name}"
    try:
        meta = json.loads(fs.cat_file(final + DONE_SUFFIX))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged sidecar proves nothing: redo the shard
    if not isinstance(meta, dict) or meta.get("digest") != plan.digest:
        return None
    try:
        if fs.size(final) != meta.get("bytes"):
            return None
    except FileNotFoundError:
        return None
    if check_sha and file_digest(fs, final)[1] != meta.get("sha256"):
        return None
    return meta


def _read_sources(fs, root: str, samples: tuple[Sample, ...]) -> list[bytes]:
    """Fetch the source files of a batch (one concurrent batch on async filesystems such as s3fs/gcsfs)."""
    paths = [f"{root}/{s.path}" for s in samples]
    return retry(functools.partial(_read_batch, fs, paths), f"reading {len(paths)} source files from {paths[0]} ...",
                 error=OSError, not_retried=(LayoutError,))


def _read_batch(fs, paths: list[str]) -> list[bytes]:
    if getattr(fs, "async_impl", False):
        got = fs.cat(paths, on_error="return")
        got = {fs._strip_protocol(k): v for k, v in got.items()}
        out = [got.get(fs._strip_protocol(p), FileNotFoundError(p)) for p in paths]
    else:
        out = [_cat_or_error(fs, p) for p in paths]
    for p, v in zip(paths, out):
        if isinstance(v, FileNotFoundError):
            raise LayoutError(f"{p}: listed in the layout but missing when read")
        if isinstance(v, BaseException):
            raise v
    return out


def _cat_or_error(fs, path: str) -> bytes | BaseException:
    try:
        return fs.cat_file(path)
    except Exception as e:
        return e


def _sample_json(sample: Sample, width: int, height: int, fmt: str, mode: str) -> tuple[bytes, int, int]:
    boxes, clipped, dropped = clip_boxes(sample.boxes, width, height)
    meta = {"key": sample.key, "wnid": sample.wnid, "label": sample.label, "width": width, "height": height,
            "format": fmt, "mode": mode, "source": sample.path,
            "boxes": [{"wnid": b.wnid, "xmin": b.xmin, "ymin": b.ymin, "xmax": b.xmax, "ymax": b.ymax} for b in boxes]}
    return json.dumps(meta, separators=(",", ":")).encode(), clipped, dropped


def write_shard(src_url: str, dst_url: str, plan: ShardPlan, check_sha: bool = True) -> dict:
    """Write one shard (or skip it when already finished); returns its sidecar plus "skipped" and "seconds"."""
    t0 = time.monotonic()
    src_fs, src_root = fsspec.core.url_to_fs(src_url)
    fs, root = fsspec.core.url_to_fs(dst_url)
    src_root, root = src_root.rstrip("/"), root.rstrip("/")
    fs.invalidate_cache()
    done = shard_done(fs, root, plan, check_sha)
    if done is not None:
        return {**done, "skipped": True, "seconds": time.monotonic() - t0}
    final = f"{root}/{plan.name}"
    if fs.exists(final + DONE_SUFFIX):
        fs.rm(final + DONE_SUFFIX)  # no sidecar may vouch for a shard while it is rewritten
    fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    bad, clipped, dropped = [], 0, 0
    try:
        with fs.open(tmp, "wb") as f:
            writer = ShardWriter(f)
            for start in range(0, len(plan.samples), READ_BATCH):
                batch = plan.samples[start:start + READ_BATCH]
                for sample, data in zip(batch, _read_sources(src_fs, src_root, batch)):
                    try:
                        width, height, fmt, mode = inspect_image(data, sample.key)
                    except CorruptImageError as e:
                        bad.append({"split": plan.split, "key": sample.key, "path": sample.path, "reason": e.reason})
                        continue
                    meta, c, d = _sample_json(sample, width, height, fmt, mode)
                    clipped, dropped = clipped + c, dropped + d
                    members = {"jpg": data}
                    if sample.label >= 0:
                        members["cls"] = str(sample.label).encode()
                    members["json"] = meta
                    writer.write(sample.key, members)
            size, sha = writer.close()
        fs.mv(tmp, final)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # the temporary may not exist; a later run removes leftovers anyway
            pass
        raise
    meta = {"name": plan.name, "split": plan.split, "number": plan.number, "digest": plan.digest,
            "samples": writer.samples, "bytes": size, "sha256": sha, "offsets": writer.offsets, "end": writer.end,
            "bad_files": bad,
            "boxes_clipped": clipped, "boxes_dropped": dropped}
    write_json_atomic(fs, final + DONE_SUFFIX, meta)
    return {**meta, "skipped": False, "seconds": time.monotonic() - t0}


def serial_map(fn: Callable, items: Iterable) -> Iterator:
    """The in-process map: `jobs.prepare` passes a Ray one instead (one task per shard)."""
    return map(fn, items)


def _remove_stale_temporaries(fs, root: str, splits: Iterable[str]) -> int:
    stale = [p for split in splits for p in fs.glob(f"{root}/{split}/*{TMP_MARK}*")]
    for p in stale:
        fs.rm(p)
    return len(stale)


def prepare_dataset(src: str, dst: str, *, shard_size: int = DEFAULT_SHARD_SIZE, splits: Iterable[str] = SPLITS,
                    seed: int = 0, map_fn: Callable[[Callable, list], Iterable[dict]] = serial_map,
                    check_sha: bool = True, log: Callable[[str], None] = print) -> dict:
    """Convert the layout at `src` into shards under `dst`; returns a summary. See the module docstring."""
    splits = list(splits)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}; valid: {', '.join(SPLITS)}")
    layout = ImageNetLayout(src)
    plans = plan_shards(layout, splits, shard_size, seed)
    fs, root = fsspec.core.url_to_fs(dst)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{INDEX_NAME}"):
        fs.rm(f"{root}/{INDEX_NAME}")  # written again last; until then the dataset is incomplete
    stale = _remove_stale_temporaries(fs, root, splits)
    total_images = sum(len(p.samples) for p in plans)
    log(f"[prepare] {src} -> {dst}: {len(plans)} shards, {total_images} images ({', '.join(splits)}); "
        f"removed {stale} stale temporaries")
    results: dict[str, dict] = {}
    t0, written, last_log = time.monotonic(), 0, 0.0
    for result in map_fn(functools.partial(write_shard, src, dst, check_sha=check_sha), plans):
        results[result["name"]] = result
        if not result["skipped"]:
            written += result["samples"] + len(result["bad_files"])
        now = time.monotonic()
        if len(results) == len(plans) or now - last_log >= PROGRESS_EVERY_S or len(results) == 1:
            skipped = sum(r["skipped"] for r in results.values())
            log(f"[prepare] {len(results)}/{len(plans)} shards ({skipped} already done), "
                f"{written / max(now - t0, 1e-9):.1f} images/s")
            last_log = now
    summary = _finish(layout, src, dst, plans, results, seed, shard_size, stale, time.monotonic() - t0)
    log(f"[prepare] {summary['total_samples']} samples in {summary['shards']} shards; {summary['bad_files']} bad files "
        f"left out (listed in {dst.rstrip('/')}/{BAD_FILES_NAME}); layout report: "
        f"{ {k: v['count'] for k, v in layout.report.items()} }")
    return summary


def _finish(layout: ImageNetLayout, src: str, dst: str, plans: list[ShardPlan], results: dict[str, dict],
            seed: int, shard_size: int, stale: int, seconds: float) -> dict:
    """Write bad_files.json, then index.json (last)."""
    fs, root = fsspec.core.url_to_fs(dst)
    root = root.rstrip("/")
    missing = [p.name for p in plans if p.name not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} shards produced no result (first: {missing[0]}); index not written")
    bad = sorted((b for r in results.values() for b in r["bad_files"]), key=lambda b: (b["split"], b["key"]))
    write_json_atomic(fs, f"{root}/{BAD_FILES_NAME}", {"count": len(bad), "files": bad})
    splits = {}
    for split in dict.fromkeys(p.split for p in plans):
        rs = [results[p.name] for p in plans if p.split == split]
        shards = [ShardInfo(r["name"], r["samples"], r["bytes"], r["sha256"]) for r in rs]
        splits[split] = SplitIndex(shards, sum(s.samples for s in shards), sum(len(r["bad_files"]) for r in rs))
    extra = {"source": src, "seed": seed, "shard_size": shard_size,
             "boxes_clipped": sum(r["boxes_clipped"] for r in results.values()),
             "boxes_dropped": sum(r["boxes_dropped"] for r in results.values()),
             "layout_report": layout.report}
    index = DatasetIndex(layout.classes, layout.class_names, splits, len(bad), extra)
    write_index(dst, index)
    return {"dst": dst, "shards": len(plans), "skipped": sum(r["skipped"] for r in results.values()),
            "samples": {k: v.samples for k, v in splits.items()}, "total_samples": index.total_samples,
            "bad_files": len(bad), "stale_temporaries_removed": stale, "seconds": round(seconds, 2)}
