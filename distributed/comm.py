"""Tiny explicit distributed helpers: rank and world, an all-reduce sum, BatchNorm statistics averaged across ranks
(timm's `--dist-bn reduce`) and per-rank RNG states gathered to rank 0 and handed back on resume."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_bn(*modules: nn.Module | None) -> None:
    """Average every BatchNorm running mean/var across ranks (timm utils.distribute_bn, reduce=True), so every
    rank evaluates and saves the same model. DDP trains on rank-local batch statistics and never syncs buffers
    after start-up (we build it with forward_sync_buffers=False); ZeRO replicates buffers without syncing them."""
    _, world = rank_and_world()
    if world == 1:
        return
    from timm.utils import distribute_bn

    for module in modules:
        if module is not None:
            distribute_bn(module, world, reduce=True)


# -- RNG: seed + rank per rank, states gathered to rank 0 ----------------------------------------------------------

def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed for (run seed, rank, step): distinct per rank, reproducible at any step."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:8], "little") >> 1


def seed_rank(seed: int, rank: int) -> None:
    """After the initial weights (seeded with `seed` on every rank): dropout and other draws differ per rank."""
    torch.manual_seed(seed + rank)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_states(device: torch.device) -> list[dict] | None:
    """Every rank's RNG state, on rank 0 (None elsewhere). A collective: every rank calls it at every checkpoint."""
    mine = rng_state(device)
    rank, world = rank_and_world()
    if world == 1:
        return [mine]
    flat = torch.cat([mine["torch"], mine.get("cuda", torch.empty(0, dtype=torch.uint8))]).to(device)
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)  # tensors, not objects: works on gloo and NCCL alike
    if rank != 0:
        return None
    n = mine["torch"].numel()
    return [{"torch": p[:n].cpu(), **({"cuda": p[n:].cpu()} if "cuda" in mine else {})} for p in parts]


def restore_rng(saved: list | dict | None, seed: int, step: int, device: torch.device) -> str:
    """Rank r takes saved[r] when the world size is unchanged, else a seed derived from (seed, rank, step).

    Returns how the state was set ("restored" or "derived"), for the attempt log.
    """
    rank, world = rank_and_world()
    if isinstance(saved, list) and len(saved) == world:
        torch.set_rng_state(saved[rank]["torch"])
        if device.type == "cuda" and "cuda" in saved[rank]:
            torch.cuda.set_rng_state(saved[rank]["cuda"], device)
        return "restored"
    torch.manual_seed(derived_seed(seed, rank, step))
    return "derived"
