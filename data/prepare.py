"""Conversion of the Kaggle ILSVRC layout into tar shards: the work behind `python -m jobs.prepare`.

Folder layout (data/index.py, CONTRACTS.md): shards at `{split}/{split}-NNNNNN.tar`; the index `_index.json`, the
per-shard sidecars `_meta/{shard}.json` and `_meta/bad_files.json` under `_` names that shard readers skip.

One call of `write_shard` writes one shard and is idempotent, so a job can run them as parallel tasks and
be re-run after a crash:

- a shard is written under a hidden temporary name (`_<name>.tmp-<id>`), then moved to its final name, then its
  sidecar records the plan digest, byte size, sha256 and the byte offset of every sample (and of the end marker);
- a shard counts as finished only when the sidecar exists, names the same plan (same samples, same storage
  options) and the final file has that size and sha256; anything else (temp names, truncated or foreign files) is
  redone.

Re-running into a live folder (one whose `_index.json` a training job may be reading) never breaks that job: the
index is replaced by an atomic move at the end, never deleted first, and a shard the live index lists is only ever
replaced by identical bytes (a resumed or repaired shard of the same plan). A changed plan (other seed, shard size,
storage options or sources) for a listed shard is refused, before anything is written when its sidecar shows the
other plan, else when the new bytes differ from the listed sha256: prepare it into a new folder. Splits this run
does not prepare are carried over from the live index.

Every image is decoded with PIL before it goes in (data/encode.py decides whether it is stored as is or
re-encoded); files that fail are left out of the shards and listed in `_meta/bad_files.json` and the index. Train
samples are shuffled once with a fixed seed before sharding, so each shard mixes classes; val and test keep
sorted order.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from data.decode import CorruptImageError
from data.encode import StoreOptions, StoredImage, store_image
from data.index import (LEGACY_INDEX_NAME, META_DIR, DatasetIndex, ShardIndexError, ShardInfo, SplitIndex, bad_files_url,
                        index_url, read_index, sidecar_url, write_index, write_json_atomic)
from data.layout import SPLITS, Box, ImageNetLayout, LayoutError, Sample, clip_boxes
from data.shards import ShardWriter, file_digest
from data.storage import fs_and_root, retry

DEFAULT_SHARD_SIZE = 1000  # ~110 MB of ImageNet JPEGs: big enough to stream, small enough to spread over tasks
TMP_MARK = ".tmp-"
READ_BATCH = 64  # source files fetched per request batch (concurrent on object stores)
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    name: str  # relative to the destination root, e.g. "train/train-000000.tar"
    samples: tuple[Sample, ...]
    digest: str  # sha256 of what goes in and how it is stored; a finished shard of another plan is redone


def _plan_digest(samples: Iterable[Sample], options: StoreOptions) -> str:
    sha = hashlib.sha256(b"imagenet-ray-shard/2\n" + json.dumps(options.describe(), sort_keys=True).encode() + b"\n")
    for s in samples:
        sha.update(json.dumps([s.key, s.path, s.label, [b.as_list() for b in s.boxes]]).encode() + b"\n")
    return sha.hexdigest()


def plan_shards(layout: ImageNetLayout, splits: Iterable[str], shard_size: int, seed: int,
                options: StoreOptions = StoreOptions()) -> list[ShardPlan]:
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
            plans.append(ShardPlan(split, number, f"{split}/{split}-{number:06d}.tar", chunk,
                                   _plan_digest(chunk, options)))
    return plans


def read_sidecar(fs, root: str, name: str) -> dict | None:
    """A shard's sidecar, or None when it is missing or damaged (a damaged sidecar proves nothing)."""
    try:
        meta = json.loads(fs.cat_file(sidecar_url(root, name)))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def shard_done(fs, root: str, plan: ShardPlan, check_sha: bool = True) -> dict | None:
    """The sidecar of a finished, intact shard of this plan; None when it has to be (re)written."""
    meta = read_sidecar(fs, root, plan.name)
    if meta is None or meta.get("digest") != plan.digest:
        return None
    final = f"{root}/{plan.name}"
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


def _scaled_boxes(boxes: list[Box], sx: float, sy: float) -> list[dict]:
    if (sx, sy) == (1.0, 1.0):
        return [{"wnid": b.wnid, "xmin": b.xmin, "ymin": b.ymin, "xmax": b.xmax, "ymax": b.ymax} for b in boxes]
    return [{"wnid": b.wnid, "xmin": round(b.xmin * sx), "ymin": round(b.ymin * sy), "xmax": round(b.xmax * sx),
             "ymax": round(b.ymax * sy)} for b in boxes]


def _sample_json(sample: Sample, image: StoredImage) -> tuple[bytes, int, int]:
    """The sample's json: stored size (boxes in its pixels), and the source's size, format and mode."""
    boxes, clipped, dropped = clip_boxes(sample.boxes, image.source_width, image.source_height)
    sx, sy = image.width / image.source_width, image.height / image.source_height
    meta = {"key": sample.key, "wnid": sample.wnid, "label": sample.label, "width": image.width,
            "height": image.height, "source_width": image.source_width, "source_height": image.source_height,
            "format": image.format, "mode": image.mode, "reencoded": list(image.reencoded), "source": sample.path,
            "boxes": _scaled_boxes(boxes, sx, sy)}
    return json.dumps(meta, separators=(",", ":")).encode(), clipped, dropped


def _write_tar(src_fs, src_root: str, plan: ShardPlan, options: StoreOptions, f: BinaryIO) -> dict:
    """Write the plan's samples into `f`; returns the sidecar fields that describe the content."""
    writer = ShardWriter(f)
    bad, clipped, dropped, reencoded = [], 0, 0, {}
    for start in range(0, len(plan.samples), READ_BATCH):
        batch = plan.samples[start:start + READ_BATCH]
        for sample, data in zip(batch, _read_sources(src_fs, src_root, batch)):
            try:
                image = store_image(data, sample.key, options)
            except CorruptImageError as e:
                bad.append({"split": plan.split, "key": sample.key, "path": sample.path, "reason": e.reason})
                continue
            meta, c, d = _sample_json(sample, image)
            clipped, dropped = clipped + c, dropped + d
            for reason in image.reencoded:
                reencoded[reason] = reencoded.get(reason, 0) + 1
            members = {"jpg": image.data}
            if sample.label >= 0:
                members["cls"] = str(sample.label).encode()
            members["json"] = meta
            writer.write(sample.key, members)
    size, sha = writer.close()
    return {"samples": writer.samples, "bytes": size, "sha256": sha, "offsets": writer.offsets, "end": writer.end,
            "bad_files": bad, "boxes_clipped": clipped, "boxes_dropped": dropped, "reencoded": reencoded}


def write_shard(src_url: str, dst_url: str, plan: ShardPlan, options: StoreOptions = StoreOptions(),
                check_sha: bool = True, live_sha: dict[str, str] | None = None) -> dict:
    """Write one shard (or skip it when already finished); returns its sidecar plus "skipped" and "seconds".

    `live_sha` maps the shards a live index lists to their sha256: such a shard is only replaced by identical bytes.
    """
    t0 = time.monotonic()
    src_fs, src_root = fs_and_root(src_url)
    fs, root = fs_and_root(dst_url)
    fs.invalidate_cache()
    done = shard_done(fs, root, plan, check_sha)
    if done is not None:
        return {**done, "skipped": True, "seconds": time.monotonic() - t0}
    final = f"{root}/{plan.name}"
    if fs.exists(sidecar_url(root, plan.name)):
        fs.rm(sidecar_url(root, plan.name))  # no sidecar may vouch for a shard while it is rewritten
    folder, _, base = final.rpartition("/")
    fs.makedirs(folder, exist_ok=True)
    fs.makedirs(sidecar_url(root, plan.name).rpartition("/")[0], exist_ok=True)
    tmp = f"{folder}/_{base}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            content = _write_tar(src_fs, src_root, plan, options, f)
        if (live_sha or {}).get(plan.name, content["sha256"]) != content["sha256"]:
            raise ValueError(_live_refusal(dst_url, plan.name, "would be rewritten with other content"))
        fs.mv(tmp, final)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # the temporary may not exist; a later run removes leftovers anyway
            pass
        raise
    meta = {"name": plan.name, "split": plan.split, "number": plan.number, "digest": plan.digest,
            "storage": options.describe(), **content}
    write_json_atomic(fs, sidecar_url(root, plan.name), meta)
    return {**meta, "skipped": False, "seconds": time.monotonic() - t0}


def serial_map(fn: Callable, items: Iterable) -> Iterator:
    """The in-process map: `jobs.prepare` passes a Ray one instead (one task per shard)."""
    return map(fn, items)


def _remove_stale_temporaries(fs, root: str, splits: Iterable[str]) -> int:
    stale = [p for split in splits for folder in (f"{root}/{split}", f"{root}/{META_DIR}/{split}")
             for p in fs.glob(f"{folder}/_*{TMP_MARK}*")]
    for p in stale:
        fs.rm(p)
    return len(stale)


def live_index(dst: str) -> DatasetIndex | None:
    """The index a running job may be reading at `dst`, None for a new folder; an old-layout folder is refused."""
    fs, root = fs_and_root(dst)
    if fs.exists(f"{root}/{LEGACY_INDEX_NAME}"):
        raise ShardIndexError(f"{dst.rstrip('/')}/{LEGACY_INDEX_NAME}: this folder was prepared by an older version "
                              "(index.json and *.done.json beside the shards); prepare into a new folder")
    return read_index(dst) if fs.exists(index_url(root)) else None


def check_live_shards(dst: str, live: DatasetIndex | None, plans: list[ShardPlan]) -> None:
    """Refuse, before writing anything, a plan that would rewrite a shard the live index lists with new content."""
    if live is None:
        return
    fs, root = fs_and_root(dst)
    listed = {s.name for split in live.splits.values() for s in split.shards}
    for plan in plans:
        meta = read_sidecar(fs, root, plan.name) if plan.name in listed else None
        if meta is not None and meta.get("digest") != plan.digest:
            raise ValueError(_live_refusal(dst, plan.name, "was prepared from a different plan"))


def _live_refusal(dst: str, name: str, what: str) -> str:
    return (f"{dst.rstrip('/')}/{name} is listed in {index_url(dst)} (a job may be reading it) and {what} (seed, "
            "shard size, --max-side/--quality or the source files differ). Shards a live index lists are never "
            "rewritten with other content: prepare into a new folder, or delete this one first")


def live_shas(live: DatasetIndex | None) -> dict[str, str]:
    return {s.name: s.sha256 for split in (live.splits.values() if live else ()) for s in split.shards}


def prepare_dataset(src: str, dst: str, *, shard_size: int = DEFAULT_SHARD_SIZE, splits: Iterable[str] = SPLITS,
                    seed: int = 0, options: StoreOptions = StoreOptions(),
                    map_fn: Callable[[Callable, list], Iterable[dict]] = serial_map, check_sha: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Convert the layout at `src` into shards under `dst`; returns a summary. See the module docstring."""
    splits = list(splits)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}; valid: {', '.join(SPLITS)}")
    layout = ImageNetLayout(src)
    plans = plan_shards(layout, splits, shard_size, seed, options)
    fs, root = fs_and_root(dst)
    fs.makedirs(root, exist_ok=True)
    live = live_index(dst)
    check_live_shards(dst, live, plans)
    stale = _remove_stale_temporaries(fs, root, splits)
    total_images = sum(len(p.samples) for p in plans)
    log(f"[prepare] {src} -> {dst}: {len(plans)} shards, {total_images} images ({', '.join(splits)}); storage "
        f"{options.describe()}; removed {stale} stale temporaries")
    results: dict[str, dict] = {}
    t0, written, last_log = time.monotonic(), 0, 0.0
    task = functools.partial(write_shard, src, dst, options=options, check_sha=check_sha, live_sha=live_shas(live))
    for result in map_fn(task, plans):
        results[result["name"]] = result
        if not result["skipped"]:
            written += result["samples"] + len(result["bad_files"])
        now = time.monotonic()
        if len(results) == len(plans) or now - last_log >= PROGRESS_EVERY_S or len(results) == 1:
            skipped = sum(r["skipped"] for r in results.values())
            log(f"[prepare] {len(results)}/{len(plans)} shards ({skipped} already done), "
                f"{written / max(now - t0, 1e-9):.1f} images/s")
            last_log = now
    summary = _finish(layout, src, dst, plans, results, live, dict(seed=seed, shard_size=shard_size, stale=stale,
                                                                   options=options, seconds=time.monotonic() - t0))
    log(f"[prepare] {summary['total_samples']} samples in {summary['shards']} shards; {summary['reencoded']} "
        f"re-encoded; {summary['bad_files']} bad files left out (listed in {bad_files_url(dst)}); layout report: "
        f"{ {k: v['count'] for k, v in layout.report.items()} }")
    return summary


def _split_indexes(plans: list[ShardPlan], results: dict[str, dict]) -> dict[str, SplitIndex]:
    splits = {}
    for split in dict.fromkeys(p.split for p in plans):
        rs = [results[p.name] for p in plans if p.split == split]
        shards = [ShardInfo(r["name"], r["samples"], r["bytes"], r["sha256"]) for r in rs]
        splits[split] = SplitIndex(shards, sum(s.samples for s in shards), sum(len(r["bad_files"]) for r in rs))
    return splits


def _carried_splits(live: DatasetIndex | None, layout: ImageNetLayout, prepared: dict) -> dict[str, SplitIndex]:
    """Splits of the live index this run did not prepare (same classes only), kept so their readers go on."""
    if live is None or live.classes != layout.classes:
        return {}
    return {k: v for k, v in live.splits.items() if k not in prepared}


def _carried_bad_files(fs, root: str, carried: dict) -> list[dict]:
    if not carried:
        return []
    try:
        return [b for b in json.loads(fs.cat_file(bad_files_url(root)))["files"] if b.get("split") in carried]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return []


def _finish(layout: ImageNetLayout, src: str, dst: str, plans: list[ShardPlan], results: dict[str, dict],
            live: DatasetIndex | None, run: dict) -> dict:
    """Write _meta/bad_files.json, then swap in the new _index.json (last, by an atomic move)."""
    fs, root = fs_and_root(dst)
    missing = [p.name for p in plans if p.name not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} shards produced no result (first: {missing[0]}); index not written")
    bad = sorted((b for r in results.values() for b in r["bad_files"]), key=lambda b: (b["split"], b["key"]))
    splits = _split_indexes(plans, results)
    carried = _carried_splits(live, layout, splits)
    listed = bad + _carried_bad_files(fs, root, carried)
    write_json_atomic(fs, bad_files_url(root), {"count": len(listed), "files": listed})
    reencoded: dict[str, int] = {}
    for r in results.values():
        for reason, n in r.get("reencoded", {}).items():
            reencoded[reason] = reencoded.get(reason, 0) + n
    extra = {"source": src, "seed": run["seed"], "shard_size": run["shard_size"],
             "storage": run["options"].describe(), "reencoded": reencoded,
             "boxes_clipped": sum(r["boxes_clipped"] for r in results.values()),
             "boxes_dropped": sum(r["boxes_dropped"] for r in results.values()),
             "layout_report": layout.report}
    index = DatasetIndex(layout.classes, layout.class_names, {**carried, **splits},
                         len(bad) + sum(s.bad_files for s in carried.values()), extra)
    write_index(dst, index)
    return {"dst": dst, "shards": len(plans), "skipped": sum(r["skipped"] for r in results.values()),
            "samples": {k: v.samples for k, v in splits.items()}, "carried_splits": sorted(carried),
            "total_samples": index.total_samples, "bad_files": len(bad), "reencoded": reencoded,
            "identity": index.identity, "stale_temporaries_removed": run["stale"],
            "seconds": round(run["seconds"], 2)}
