"""Choosing the checkpoint to resume from: the newest `checkpoint_<step>` of the run whose manifests verify.

Ray Train returns the latest checkpoint it registered; storage may hold a newer complete one (the driver died
between upload and registration) or Ray's latest may be truncated or corrupt. Rank 0 lists the run's
checkpoint directories (`checkpoint.list_checkpoints`, names sort by step), verifies them newest first, warns
about each one it skips and tells every rank which one to load. The chosen checkpoint is downloaded once per
node: rank 0 has it already, the local rank 0 of every other node fetches it, and the other ranks of a node wait
and read that copy (a local run folder is read in place). A new checkpoint of a step that already has a
directory (after a fallback, or the epoch-end checkpoint after resuming from a preemption checkpoint of the
epoch's last step) gets a suffix, `checkpoint_<step>-<id>`: it must not land in a directory Ray still tracks for
an older checkpoint, since Ray deletes tracked directories when it retires them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass

import fsspec
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from data import check_same_order
from distributed import checkpoint as ckpt
from distributed.run_folder import join


def check_resumable(saved: dict, order: dict, where: str) -> None:
    """A checkpoint continues this run only with a global sample position (`samples`, written since the training
    order stopped depending on the world size) and the same training `order` (data.order_fingerprint: index, seed,
    global batch, shuffle budget). `saved`: the checkpoint's state or its meta.json. Raises CheckpointError."""
    if "samples" not in saved or "order" not in saved:
        raise ckpt.CheckpointError(
            f"checkpoint {where} was written by an older version: its data position is (epoch, batch of one rank), "
            "which cannot be continued exactly (and not at another world size) by the current loader. Start a new "
            "run.name, or set resume_from to a checkpoint written by this version")
    try:
        check_same_order(saved["order"], order)
    except ValueError as e:
        raise ckpt.CheckpointError(f"checkpoint {where}: {e}") from None


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


def _is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def _pick_verified(parent: str, names: list[str], local: str) -> str | None:
    """Rank 0: the first of `names` whose manifests verify, downloaded to `local` (or read in place)."""
    for name in names:
        url = join(parent, name)
        try:
            directory = ckpt.download(url, local)
            ckpt.verify_checkpoint(directory)
            return name
        except ckpt.CheckpointError as e:
            warnings.warn(f"skipping checkpoint {url}: {e}", stacklevel=2)
            print(f"WARNING: skipping checkpoint {url}: {e}", flush=True)
            if not _is_local(url):
                shutil.rmtree(local, ignore_errors=True)
    return None


def _candidates(run_uri: str, resume_from: str | None, ray_latest: str | None) -> tuple[str, list[str], str]:
    """(parent URL, names newest first, source label) of the run's own checkpoints, else of `resume_from`."""
    names = ckpt.list_checkpoints(run_uri)
    if ray_latest and ray_latest not in names:  # Ray knows a checkpoint the listing does not show: keep it
        names = sorted({*names, ray_latest}, reverse=True)
    if names or not resume_from:
        return run_uri, names, "run"
    parent, name = resume_from.rstrip("/").rsplit("/", 1)
    older = [n for n in ckpt.list_checkpoints(parent) if n < name]  # fall back within that run too
    return parent, [name, *older], f"resume_from={resume_from}"


def _choose(run_uri: str, resume_from: str | None, ray_latest: str | None, local: str) -> tuple:
    """Rank 0's decision as a picklable tuple: ("scratch",), ("error", message) or ("ok", parent, name, ...)."""
    parent, names, label = _candidates(run_uri, resume_from, ray_latest)
    if not names:
        return ("scratch",)
    chosen = _pick_verified(parent, names, local)
    if chosen is None and label == "run" and ray_latest is None:
        # Ray Train registered none of them: each is an upload that a lost node or a killed driver cut short
        # (Ray uploads a checkpoint's files in parallel, the manifest may land before state.pt). Nothing was
        # committed, so the run starts where it would have without them.
        print(f"WARNING: no checkpoint under {parent} verifies and Ray Train registered none of them "
              f"({', '.join(names)}: partial uploads); starting from scratch", flush=True)
        return ("scratch",)
    if chosen is None:
        return ("error", f"no checkpoint under {parent} verifies (tried {', '.join(names)})")
    newest = max(ckpt.checkpoint_step(n) for n in names) if label == "run" else -1
    return ("ok", parent, chosen, label, newest, uuid.uuid4().hex[:6])


def _broadcast(decision: tuple) -> tuple:
    if not (dist.is_available() and dist.is_initialized()):
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def resolve_checkpoint(run_uri: str, resume_from: str | None, ray_latest: str | None, rank: int, local_rank: int):
    """Yield a `Resume`; every rank gets the same checkpoint (one local copy per node, removed afterwards).

    `ray_latest` is the name of the checkpoint Ray Train registered last (None without one).
    """
    local = os.path.join(tempfile.gettempdir(), f"resume-{uuid.uuid4().hex[:8]}")
    decision = ("scratch",)
    if rank == 0:
        try:
            decision = _choose(run_uri, resume_from, ray_latest, local) + (local,)
        except Exception as e:  # noqa: BLE001 -- tell the other ranks instead of leaving them in the broadcast
            decision = ("error", f"choosing a checkpoint failed: {type(e).__name__}: {e}")
    decision = _broadcast(decision)
    if decision[0] == "scratch":
        yield Resume(None, "scratch")
        return
    if decision[0] == "error":
        raise ckpt.CheckpointError(decision[1])
    _, parent, chosen, label, newest, suffix, node_copy = decision
    url = join(parent, chosen)
    in_place = _is_local(url)
    # Rank 0 downloaded before the broadcast, so its node's copy exists; another node's local rank 0 fetches it
    # to the same path on its machine (several Ray nodes on one machine share it).
    if not in_place and rank != 0 and local_rank == 0 and not os.path.exists(node_copy):
        ckpt.download(url, node_copy)
        ckpt.verify_checkpoint(node_copy)
    _barrier()  # the node's copy is complete before its other ranks read it
    try:
        yield Resume(fsspec.core.url_to_fs(url)[1] if in_place else node_copy, f"{label}:{chosen}", newest, suffix)
    finally:
        _barrier()  # every rank of the node has loaded before the copy goes
        if local_rank == 0 and not in_place:
            shutil.rmtree(node_copy, ignore_errors=True)
