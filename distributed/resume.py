"""Choosing the checkpoint to resume from: the run's latest, verified, else the newest older one that verifies.

Ray Train returns the latest reported checkpoint; if storage lost or corrupted part of it, resuming from it
would load garbage or crash. Rank 0 verifies the manifests and falls back to older siblings
(`checkpoint_<step>` directories sort by step), then tells every rank which one to load.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings

import pyarrow.fs as pafs
import ray.train
import torch.distributed as dist

from distributed import checkpoint as ckpt
from distributed.config import Config


def _older_siblings(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = os.path.dirname(path), os.path.basename(path)
    infos = fs.get_file_info(pafs.FileSelector(parent))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(path=f"{parent}/{n}", filesystem=fs) for n in names]


def _download(checkpoint: ray.train.Checkpoint) -> str:
    local = tempfile.mkdtemp(prefix="resume-")
    checkpoint.to_directory(local)
    return local


def _pick_verified(checkpoint: ray.train.Checkpoint) -> tuple[ray.train.Checkpoint | None, str | None]:
    """Rank 0: the newest checkpoint (this one, then older siblings) whose manifests verify."""
    for candidate in [checkpoint, *_older_siblings(checkpoint)]:
        local = _download(candidate)
        try:
            ckpt.verify_checkpoint(local)
            return candidate, local
        except ckpt.CheckpointError as e:
            warnings.warn(f"skipping checkpoint {candidate.path}: {e}", stacklevel=2)
            print(f"WARNING: skipping checkpoint {candidate.path}: {e}", flush=True)
            shutil.rmtree(local, ignore_errors=True)
    return None, None


@contextlib.contextmanager
def resolve_checkpoint(cfg: Config):
    """Yield (local directory or None, source description); every rank gets the same checkpoint."""
    checkpoint, source = ray.train.get_checkpoint(), "run"
    if checkpoint is None and cfg.resume_from:
        checkpoint, source = ray.train.Checkpoint(path=cfg.resume_from), f"resume_from={cfg.resume_from}"
    if checkpoint is None:
        yield None, "scratch"
        return
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    chosen, local = (_pick_verified(checkpoint) if rank == 0 else (None, None))
    box = [chosen.path if chosen is not None else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise ckpt.CheckpointError(f"no checkpoint that verifies at or before {checkpoint.path}")
    if local is None:
        local = _download(ray.train.Checkpoint(path=box[0], filesystem=checkpoint.filesystem))
        ckpt.verify_checkpoint(local)
    try:
        yield local, f"{source}:{os.path.basename(box[0].rstrip('/'))}"
    finally:
        shutil.rmtree(local, ignore_errors=True)
