"""The one checkpoint format: a directory with `state.pt` (+ DeepSpeed ZeRO files) and manifests written last.

Every file is written under a temporary name and renamed; each writing rank then writes
`manifest.rank<r>.json` (sizes and sha256 of its files). `verify_checkpoint` checks all manifests before a load,
so a half-uploaded or truncated checkpoint is never taken for a complete one. `state.pt` is read with
`torch.load(weights_only=True)`: a checkpoint from a shared bucket cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"


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
    return f"checkpoint_{step:010d}"
