"""What the loop learns about its steps without stalling the device: loss sum, non-finite losses, fp16 skips and
the preemption flags accumulate on the device and are read in one stacked all-reduce and one host read per
`run.log_every_steps` steps (and at checkpoints and epoch ends, so a diverged model is never saved).

On a GPU every host read (`.item()`, `.tolist()`, `bool(tensor)`) waits for the queued kernels; one per
log interval keeps the queue full. The costs: a NaN is noticed up to log_every_steps steps late (the error still
names its exact step), a SIGTERM or a node drain is acted on at the next read, and the lr learns of fp16-skipped
steps at the next read (see docs/precision.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from distributed.comm import all_reduce_sum, rank_and_world
from distributed.config import Config
from distributed.loss import NonFiniteLossError


@dataclass(frozen=True)
class Synced:
    """One read of the accumulators, summed over ranks."""

    steps: int  # steps since the previous read (per rank)
    loss: float  # mean finite loss over those steps and ranks (nan when none was finite)
    nonfinite: int  # non-finite losses, all ranks
    skipped: int  # optimizer steps the fp16 loss scaler skipped (the same on every rank)
    longest_skip_run: int  # the longest run of consecutive skipped steps up to now
    corrupt: int  # corrupt training images skipped, all ranks
    sigterm: bool  # some rank got SIGTERM
    drain: bool  # Ray reported a drain of a node of this run to some rank


class StepStats:
    """Device-side accumulators of the steps since the last `sync`."""

    def __init__(self, device: torch.device, start_step: int):
        self.device, self.start_step = device, start_step
        self.zero = torch.zeros((), device=device)
        self.skip_run = self.zero.clone()  # consecutive skipped steps so far (persists across reads)
        self.step_no = self.zero.clone()  # steps since start_step, on the device: names a non-finite loss's step
        self._first_bad = None
        self.reset()

    def reset(self) -> None:
        z = self.zero
        self.loss_sum, self.finite, self.first_bad = z.clone(), z.clone(), z.clone() - 1
        self.skipped, self.longest = z.clone(), self.skip_run.clone()
        self.steps, self.corrupt = 0, 0

    def add(self, loss: torch.Tensor, applied: torch.Tensor, corrupt: int) -> None:
        """Record one step (device ops only)."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss).float()
        self.step_no += 1
        self.loss_sum += torch.where(finite > 0, loss, self.zero)
        self.finite += finite
        self.first_bad = torch.where((finite == 0) & (self.first_bad < 0), self.step_no, self.first_bad)
        skipped = 1 - applied
        self.skipped += skipped
        self.skip_run = (self.skip_run + 1) * skipped
        self.longest = torch.maximum(self.longest, self.skip_run)
        self.steps += 1
        self.corrupt += corrupt

    def sync(self, sigterm: bool, drain: bool) -> Synced:
        """One all-reduce of the stacked accumulators and one host read; then start counting afresh."""
        _, world = rank_and_world()
        flags = torch.tensor([float(self.corrupt), float(sigterm), float(drain)]).to(self.device, non_blocking=True)
        nonfinite = self.steps - self.finite
        stacked = torch.cat([torch.stack([self.loss_sum, self.finite, nonfinite, self.skipped, self.longest]), flags])
        loss_sum, finite, bad, skipped, longest, corrupt, term, drained = all_reduce_sum(stacked).tolist()
        # The loss scaler's decision is global (gradients are all-reduced first): skips are equal on every rank.
        out = Synced(self.steps, loss_sum / finite if finite else float("nan"), round(bad), round(skipped / world),
                     round(longest / world), round(corrupt), term > 0, drained > 0)
        self._first_bad = self.first_bad if out.nonfinite else None
        self.reset()
        return out

    def first_nonfinite_step(self) -> int:
        """On the error path only: the run's step of the first non-finite loss on any rank (more collectives)."""
        local = self._first_bad if self._first_bad is not None else self.zero - 1
        found = torch.where(local >= 0, local, torch.full_like(local, float("inf")))
        if rank_and_world()[1] > 1:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
        return self.start_step + int(found.item())


def check_divergence(cfg: Config, synced: Synced, stats: StepStats, state) -> None:
    """Stop, naming step and loss, when the loss turns non-finite beyond fp16's ordinary overflow skips."""
    fp16 = cfg.strategy.precision == "fp16"
    if synced.nonfinite and not fp16:
        step = stats.first_nonfinite_step()
        raise NonFiniteLossError(
            f"loss became non-finite at step {step} (epoch {state.epoch}; {synced.nonfinite} non-finite losses "
            f"up to step {state.step}): training diverged. Lower optim.base_lr, raise schedule.warmup_epochs or set "
            "optim.grad_clip_norm.")
    if synced.longest_skip_run > cfg.strategy.max_skipped_steps:
        raise NonFiniteLossError(
            f"{synced.longest_skip_run} fp16 steps in a row overflowed up to step {state.step} (last mean loss "
            f"{synced.loss}): training diverged beyond what loss scaling absorbs.")


class Progress:
    """A line every `log_every_steps` with loss, lr, images/s, data-wait fraction and ETA (rank 0 prints)."""

    def __init__(self, cfg: Config, world: int, total_steps: int, metrics=None):
        self.cfg, self.world, self.total, self.metrics = cfg, world, total_steps, metrics
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.images = time.perf_counter(), 0.0, 0

    def add(self, batch_images: int, wait: float) -> None:
        self.images += batch_images
        self.wait += wait

    def emit(self, state, synced: Synced, lr: float) -> None:
        if synced.steps == 0:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record = {"kind": "train", "epoch": state.epoch, "step": state.step, "loss": synced.loss, "lr": lr,
                  "images_per_s": self.images * self.world / elapsed, "data_wait": self.wait / elapsed,
                  "skipped_steps": synced.skipped, "time": time.time()}
        eta = (self.total - state.step) * elapsed / synced.steps
        if self.metrics is not None:
            self.metrics.log(record)
            print(f"epoch {state.epoch + 1}/{self.cfg.schedule.epochs} step {state.step}/{self.total} "
                  f"loss {record['loss']:.4f} lr {lr:.4g} {record['images_per_s']:.1f} img/s "
                  f"data-wait {100 * record['data_wait']:.0f}% eta {eta / 60:.1f} min", flush=True)
        self.reset()
