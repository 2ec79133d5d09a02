"""Choosing the checkpoint to resume from: the newest `checkpoint_<step>` of the run whose manifests verify.

Ray Train returns the latest checkpoint it registered; storage may hold a newer complete one (the driver died
between upload and registration) or Ray's latest may be truncated or corrupt. Rank 0 lists the run's
checkpoint directories (names sort by step), verifies them newest first, warns about each one it skips and
tells every rank which one to load. A new checkpoint of a step that already has a directory (after a fallback,
or the epoch-end checkpoint after resuming from a preemption checkpoint of the epoch's last step) gets a suffix,
`checkpoint_<step>-<id>`: it must not land in a directory Ray still tracks for an older checkpoint, since Ray
deletes tracked directories when it retires them.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray.train
import torch.distributed as dist

from distributed import checkpoint as ckpt
from distributed.config import Config

PREFIX = "checkpoint_"
NAME = re.compile(r"checkpoint_\d{10}(-[0-9a-f]+)?")  # ckpt.checkpoint_dir_name, plus the fallback suffix


@dataclass(frozen=True)
class Resume:
    """Where a worker resumes from, and how it names its next checkpoints."""

    directory: str | None  # local copy of the chosen checkpoint, None when starting from scratch
    source: str  # "scratch", "run:checkpoint_<step>" or "resume_from=<url>:checkpoint_<step>"
    newest_step: int = -1  # step of the newest checkpoint directory of the run on storage, good or not
    suffix: str = ""  # names of steps <= newest_step get "-<suffix>" (such a directory may exist already)

    def checkpoint_name(self, step: int) -> str:
        name = ckpt.checkpoint_dir_name(step)
        return f"{name}-{self.suffix}" if self.suffix and step <= self.newest_step else name


def checkpoint_step(name: str) -> int:
    """`checkpoint_0000000008` or `checkpoint_0000000008-1a2b3c` -> 8."""
    return int(name[len(PREFIX):].split("-", 1)[0])


def _list_checkpoints(fs: pafs.FileSystem, parent: str) -> list[str]:
    """Checkpoint directory names under `parent`, newest first."""
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    return sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and NAME.fullmatch(i.base_name)), reverse=True)


def _download(checkpoint: ray.train.Checkpoint) -> str:
    local = tempfile.mkdtemp(prefix="resume-")
    checkpoint.to_directory(local)
    return local


def _pick_verified(fs: pafs.FileSystem, parent: str, names: list[str]) -> tuple[str | None, str | None]:
    """Rank 0: the first of `names` whose manifests verify, and its local copy."""
    for name in names:
        candidate = ray.train.Checkpoint(path=f"{parent}/{name}", filesystem=fs)
        local = _download(candidate)
        try:
            ckpt.verify_checkpoint(local)
            return name, local
        except ckpt.CheckpointError as e:
            warnings.warn(f"skipping checkpoint {candidate.path}: {e}", stacklevel=2)
            print(f"WARNING: skipping checkpoint {candidate.path}: {e}", flush=True)
            shutil.rmtree(local, ignore_errors=True)
    return None, None


def _run_checkpoints(cfg: Config) -> tuple[pafs.FileSystem, str, list[str], str]:
    """(filesystem, parent path, names newest first, source label) of the run's own checkpoints, else resume_from."""
    storage = ray.train.get_context().get_storage()  # DeveloperAPI: the RunConfig's filesystem and run path
    fs, parent = storage.storage_filesystem, storage.experiment_fs_path.rstrip("/")
    names = _list_checkpoints(fs, parent)
    latest = ray.train.get_checkpoint()
    if latest is not None:
        name = os.path.basename(latest.path.rstrip("/"))
        if name not in names:  # Ray knows a checkpoint the listing does not show: keep it a candidate
            names = sorted({*names, name}, reverse=True)
    if names or not cfg.resume_from:
        return fs, parent, names, "run"
    fs, path = pafs.FileSystem.from_uri(cfg.resume_from)
    parent, name = os.path.dirname(path.rstrip("/")), os.path.basename(path.rstrip("/"))
    older = [n for n in _list_checkpoints(fs, parent) if n < name]  # fall back within that run too
    return fs, parent, [name, *older], f"resume_from={cfg.resume_from}"


def _choose(cfg: Config) -> tuple[tuple, str | None]:
    """Rank 0's decision as a picklable tuple (("scratch",), ("error", message) or ("ok", ...)) and its local copy."""
    fs, parent, names, label = _run_checkpoints(cfg)
    if not names:
        return ("scratch",), None
    chosen, local = _pick_verified(fs, parent, names)
    if chosen is None:
        return ("error", f"no checkpoint under {parent} verifies (tried {', '.join(names)})"), None
    newest = max(checkpoint_step(n) for n in names) if label == "run" else -1
    return ("ok", fs, parent, chosen, label, newest, uuid.uuid4().hex[:6]), local


@contextlib.contextmanager
def resolve_checkpoint(cfg: Config):
    """Yield a `Resume`; every rank gets the same checkpoint (a local copy, removed afterwards) and naming."""
    distributed = dist.is_available() and dist.is_initialized()
    decision, local = ("scratch",), None
    if not distributed or dist.get_rank() == 0:
        try:
            decision, local = _choose(cfg)
        except Exception as e:  # noqa: BLE001 -- tell the other ranks instead of leaving them in the broadcast
            decision = ("error", f"choosing a checkpoint failed: {type(e).__name__}: {e}")
    if distributed:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    if decision[0] == "scratch":
        yield Resume(None, "scratch")
        return
    if decision[0] == "error":
        raise ckpt.CheckpointError(decision[1])
    _, fs, parent, chosen, label, newest, suffix = decision
    if local is None:
        local = _download(ray.train.Checkpoint(path=f"{parent}/{chosen}", filesystem=fs))
        ckpt.verify_checkpoint(local)
    try:
        yield Resume(local, f"{label}:{chosen}", newest, suffix)
    finally:
        shutil.rmtree(local, ignore_errors=True)
