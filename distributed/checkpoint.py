"""The one checkpoint format: a directory with `state.pt` (+ DeepSpeed ZeRO files), `meta.json`, manifests last;
and the one listing of a run folder's checkpoints, used by resume, evaluate, predict, report and export.

Every file is written under a temporary name and renamed; each writing rank then writes
`manifest.rank<r>.json` (sizes and sha256 of its files). `verify_checkpoint` checks all manifests before a load,
so a half-uploaded or truncated checkpoint is never taken for a complete one. `meta.json` (role, step, epoch,
score) lets tools pick the newest or the best checkpoint without unpickling anything. Checkpoint roles follow
timm's: "recovery" checkpoints (mid-epoch, SIGTERM, drain) carry no score; "evaluated" ones (epoch ends) carry
the val top-1 that ranks them. Every file is read with `torch.load(weights_only=True)`, DeepSpeed's own files
included (`check_weights_only` before DeepSpeed reads them): a checkpoint from a shared bucket cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from distributed.run_folder import join, retry

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
ROLES = ("recovery", "evaluated")
PREFIX = "checkpoint_"
# checkpoint_dir_name(step), plus the suffix resume gives a step that already has a directory. Nothing else in a
# run folder matches: not Ray's checkpoint_manager_snapshot.json, .validate_storage_marker, metrics, TensorBoard.
NAME = re.compile(r"checkpoint_\d{10}(-[0-9a-f]+)?")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the directory and file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_manifest(directory: str | Path, rank: int, world_size: int, writers: int = 1,
                   files: list[str] | None = None) -> Path:
    """Record size and sha256 of this rank's files (all files under `directory` when `files` is None).

    `writers` (rank 0's manifest) is how many ranks wrote files: 1 for DDP, the world size for ZeRO shards.
    Write it last: its presence marks this rank's part complete.
    """
    root = Path(directory)
    if files is None:
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("manifest."))
    entries = {f: {"bytes": (root / f).stat().st_size, "sha256": _sha256(root / f)} for f in files}
    manifest = {"format_version": FORMAT_VERSION, "rank": rank, "world_size": world_size, "writers": writers,
                "files": entries}
    path = root / f"manifest.rank{rank}.json"
    atomic_write_text(path, json.dumps(manifest, indent=1))
    return path


def _read_manifest(root: Path, rank: int, writers: int) -> dict:
    path = root / f"manifest.rank{rank}.json"
    if not path.exists() and rank == 0:
        raise CheckpointError(f"checkpoint {root}: no {path.name} (incomplete upload or not a checkpoint)")
    if not path.exists():
        raise CheckpointError(f"checkpoint {root}: {path.name} missing ({writers} ranks wrote this checkpoint)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {root}: {path.name} is not valid JSON ({e})") from None


def verify_checkpoint(directory: str | Path, writers: int | None = None) -> dict:
    """Check every manifest and every file it lists; return rank 0's manifest. Raises CheckpointError."""
    root = Path(directory)
    head = _read_manifest(root, 0, 1)
    if head.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {root}: format_version {head.get('format_version')} != {FORMAT_VERSION}")
    writers = writers if writers is not None else head.get("writers", 1)
    for rank in range(writers):
        manifest = head if rank == 0 else _read_manifest(root, rank, writers)
        for name, meta in manifest["files"].items():
            path = root / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint {root}: {name} listed in manifest.rank{rank}.json is missing")
            size = path.stat().st_size
            if size != meta["bytes"]:
                raise CheckpointError(f"checkpoint {root}: {name} has {size} bytes, manifest says {meta['bytes']}")
            if _sha256(path) != meta["sha256"]:
                raise CheckpointError(f"checkpoint {root}: {name} fails its sha256 check (corrupt)")
    return head


def save_state(directory: str | Path, state: dict) -> None:
    """Write `state.pt` atomically. The state holds plain tensors, numbers, strings, lists and dicts only."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, Path(directory) / STATE_FILE)


def load_state(directory: str | Path, verify: bool = True) -> dict:
    if verify:
        verify_checkpoint(directory)
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} missing") from None


def checkpoint_dir_name(step: int) -> str:
    """Sortable names, so the newest checkpoint is the last in a listing."""
    return f"{PREFIX}{step:010d}"


def checkpoint_step(name: str) -> int:
    """`checkpoint_0000000008` or `checkpoint_0000000008-1a2b3c` -> 8."""
    return int(name[len(PREFIX):].split("-", 1)[0])


# -- meta.json: what a tool needs to choose a checkpoint -------------------------------------------------------------

def write_meta(directory: str | Path, *, role: str, step: int, epoch: int, samples: int, score: float | None,
               metric: str, order: dict | None = None) -> None:
    """`meta.json` (rank 0, before its manifest, which then covers it). `score` is None for recovery checkpoints.
    `samples`: samples of `epoch` trained (the global data position); `order`: the training order's fingerprint
    (data.order_fingerprint), so a resume can be checked without unpickling the state."""
    if role not in ROLES:
        raise ValueError(f"checkpoint role {role!r}; valid: {', '.join(ROLES)}")
    meta = {"format_version": FORMAT_VERSION, "role": role, "step": step, "epoch": epoch, "samples": samples,
            "score": score, "metric": metric, "order": order}
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(directory) / META_FILE, json.dumps(meta, indent=1))


def read_meta(url: str) -> dict | None:
    """A checkpoint's meta.json (any fsspec URL), or None when it has none (written before meta.json existed)."""
    fs, path = fsspec.core.url_to_fs(url.rstrip("/"))

    def read():
        try:
            with fs.open(f"{path}/{META_FILE}", "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    text = retry(read, f"reading {META_FILE} of {url}")
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {url}: {META_FILE} is not valid JSON ({e})") from None


# -- the one listing ------------------------------------------------------------------------------------------------

def list_checkpoints(url: str) -> list[str]:
    """Names of the checkpoint directories in a run folder (local, s3://, gs://), newest first; [] when none.

    Only names of `checkpoint_dir_name`'s form count: Ray's own files beside them are never taken for one.
    """
    fs, path = fsspec.core.url_to_fs(url.rstrip("/"))

    def ls():
        fs.invalidate_cache(path)  # s3fs/gcsfs cache listings; a run folder changes under us
        try:
            return fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    entries = retry(ls, f"listing {url}")
    names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}
    return sorted((n for n in names if NAME.fullmatch(n)), reverse=True)


def download(url: str, local: str) -> str:
    """Copy a checkpoint directory to `local` (retried like every storage read) and return the local path; a
    checkpoint on the local filesystem is returned in place."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    part = f"{local}.part-{uuid.uuid4().hex[:6]}"

    def get():
        shutil.rmtree(part, ignore_errors=True)
        fs.get(path.rstrip("/") + "/", part + "/", recursive=True)

    retry(get, f"downloading {url}")
    os.replace(part, local)
    return local


def is_checkpoint_dir(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url.rstrip("/"))
    return retry(lambda: fs.exists(f"{path}/manifest.rank0.json"), f"checking {url}")


def best_evaluated(run_url: str, names: list[str]) -> tuple[str, dict] | None:
    """(name, meta) of the evaluated checkpoint with the highest score among `names`; ties go to the newest."""
    best = None
    for name in names:  # newest first: a later one replaces an equal score only if strictly higher
        meta = read_meta(join(run_url, name))
        score = None if meta is None or meta.get("role") != "evaluated" else meta.get("score")
        if isinstance(score, (int, float)) and math.isfinite(score) and (best is None or score > best[1]["score"]):
            best = (name, meta)
    return best


def select_checkpoint(url: str, best: bool = False) -> str:
    """The checkpoint directory URL for `url`: a checkpoint directory as it is; for a run folder its newest
    checkpoint or, with best=True, its evaluated checkpoint with the highest score. Raises CheckpointError."""
    url = url.rstrip("/")
    if is_checkpoint_dir(url):
        return url
    names = list_checkpoints(url)
    if not names:
        raise CheckpointError(f"{url}: neither a checkpoint directory (no manifest.rank0.json) nor a run folder "
                              "holding checkpoint_* directories")
    if not best:
        return join(url, names[0])
    chosen = best_evaluated(url, names)
    if chosen is None:
        raise CheckpointError(f"{url}: none of its checkpoints ({', '.join(names)}) is an evaluated one with a "
                              "score in meta.json (recovery checkpoints, or written before meta.json existed); "
                              "drop --best to take the newest")
    return join(url, chosen[0])


# -- DeepSpeed files: weights_only too -------------------------------------------------------------------------------

# The non-tensor types DeepSpeed 0.19.8 pickles into its checkpoints (found by listing the GLOBAL opcodes of
# stage 0-3 checkpoints): plain data classes and an enum, whose construction runs no code of the file's choosing.
DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                          ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                          ("deepspeed.utils.tensor_fragment", "fragment_address"))


def _deepspeed_safe_globals() -> list:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_SAFE_GLOBALS]


def check_weights_only(directory: str | Path) -> None:
    """Load every `*.pt` under `directory` with weights_only=True (DeepSpeed's few types allowlisted) before
    DeepSpeed's own loader, which unpickles without weights_only, reads them. Raises CheckpointError."""
    root = Path(directory)
    allowed = _deepspeed_safe_globals()
    for path in sorted(root.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
            lines = str(e).strip().splitlines()
            reason = next((s.strip() for s in lines if "WeightsUnpickler error" in s), lines[0] if lines else "")
            reason = reason.split(". Please use", 1)[0]  # torch's advice to allowlist the global: not for a payload
            raise CheckpointError(
                f"checkpoint {root}: {path.relative_to(root)} does not load with weights_only=True "
                f"({type(e).__name__}: {reason}); refusing it: unpickling it could run code. "
                "Only tensors, containers and DeepSpeed's allowlisted types "
                f"({', '.join(m + '.' + n for m, n in DEEPSPEED_SAFE_GLOBALS)}) are accepted") from None
