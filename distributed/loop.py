"""The phases of the training loop: one epoch of training steps, and an evaluation.

Shape follows torchvision's references/classification/train.py: `train_one_epoch` and `evaluate` are small
functions; `distributed.worker.train_loop_per_worker` wires them together with restore and report. The phases
take their seams (`Phases.report`, `Phases.preemption`) as arguments, so they run without Ray too
(tests/test_loop.py).
Every rank reports at the same steps (`ray.train.report` is a barrier): every `run.checkpoint_every_steps` (a
recovery checkpoint), each epoch end (an evaluated one), on SIGTERM and on a node drain (distributed/preemption.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from data import ShardFormatError, StreamOptions, device_batch
from distributed.accuracy import AccuracyTally
from distributed.comm import rank_and_world
from distributed.config import Config
from distributed.loss import compute_loss
from distributed.monitor import Progress, StepStats, check_divergence
from distributed.optim import lr_at
from models import split_outputs


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (== epochs when finished)
    samples: int = 0  # samples of `epoch` already trained, over all ranks (a multiple of G): the data position
    step: int = 0  # optimizer steps (global batches) since the start of the run
    skipped_steps: int = 0  # optimizer steps the fp16 loss scaler skipped, as of the last synchronisation
    best_top1: float = 0.0
    best_top5: float = 0.0
    best_score: float = float("-inf")
    last_top1: float = 0.0

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps actually applied: what the lr schedule advances by."""
        return self.step - self.skipped_steps

    def restore(self, saved: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class Phases:
    """What train_one_epoch and evaluate need besides the state and the loader."""

    cfg: Config
    strategy: Any
    device: torch.device
    steps_per_epoch: int  # N_train // G, whatever the number of ranks
    num_classes: int
    report: Callable[..., None]  # report(role, values, wait=False); distributed.reporting.Reporter in Ray
    preemption: Any  # .flags() -> (sigterm, drain), .stand_down(step); distributed.preemption.Preemption in Ray
    progress: Progress
    stats: StepStats
    corrupt: int = 0  # corrupt training images of this epoch, all ranks (as of the last synchronisation)
    sample_log: Any = None  # SampleLog when run.sample_log is set (tests): every trained key, per step and rank

    @property
    def epoch_samples(self) -> int:
        """Samples of a whole epoch: steps_per_epoch global batches."""
        return self.steps_per_epoch * self.cfg.data.global_batch_size


def stream_options(cfg: Config) -> StreamOptions:
    """The loaders' settings from the run config (the same for every rank and every launch)."""
    return StreamOptions.from_config(cfg.data, cfg.run.seed)


def rng_neutral(batches: Iterable[dict]) -> Iterator[dict]:
    """Iterate a loader without touching the training RNG: a DataLoader draws its loader workers' base seed from
    the global generator (and an in-process loader runs in this process), which would shift a resumed run's
    dropout masks against the uninterrupted run's."""
    it = None
    while True:
        with torch.random.fork_rng(devices=[]):
            it = iter(batches) if it is None else it
            batch = next(it, None)
        if batch is None:
            return
        yield batch


class SampleLog:
    """Test hook (run.sample_log): each rank appends, per step, the keys it trained (and the corrupt ones) to
    `{folder}/samples.rank<r>.jsonl`, so a test can check that an epoch trained every sample exactly once."""

    def __init__(self, folder: str, rank: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"samples.rank{rank}.jsonl")
        self.rank = rank

    def write(self, epoch: int, step: int, world: int, batch: dict) -> None:
        record = {"epoch": epoch, "step": step, "rank": self.rank, "world": world, "keys": list(batch["key"]),
                  "corrupt": list(batch["corrupt"])}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def check_labels(batch: dict, num_classes: int, url: str) -> None:
    """Labels must lie in [0, num_classes): elsewhere the loss fails obscurely (a device-side assert on GPU).

    Checked on the loader's host tensor (numpy), so no device is waited for."""
    labels = batch["label"].numpy()
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()[0]
    if len(bad):
        i = int(bad[0])
        raise ShardFormatError(f"{url}: training sample {batch['key'][i]!r} has label {int(labels[i])}, but the index "
                               f"has {num_classes} classes (0-{num_classes - 1}); re-run jobs.prepare")


def train_one_epoch(ph: Phases, state: TrainState, loader) -> bool:
    """Train `loader` (a data.TrainLoader) from the position `state.samples` to the end of the epoch; False when
    stopped early by run.stop_after_steps. Every step is one global batch of G samples, G / world on this rank.

    On SIGTERM or a drain notice it checkpoints and hands over to `preemption.stand_down`, which does not return.
    """
    cfg, strategy = ph.cfg, ph.strategy
    global_batch = cfg.data.global_batch_size
    strategy.train(True)
    t_wait = time.perf_counter()
    for batch in rng_neutral(loader.epoch(state.epoch, state.samples // global_batch)):
        wait = time.perf_counter() - t_wait
        check_labels(batch, ph.num_classes, cfg.data.url)
        batch = device_batch(batch, ph.device, cfg.data.image_size, cfg.model.channels_last)
        if ph.sample_log is not None:
            ph.sample_log.write(state.epoch, state.samples // global_batch, loader.world, batch)
        strategy.set_lr(lr_at(cfg, state.optimizer_steps, ph.steps_per_epoch))
        loss = compute_loss(cfg, strategy.forward(batch["image"]), batch["label"])
        applied = strategy.step(loss)
        state.step += 1
        state.samples += global_batch
        strategy.after_step(state.step)
        ph.stats.add(loss, applied, len(batch["corrupt"]))
        ph.progress.add(len(batch["label"]), wait)
        if not after_step(ph, state):
            return False
        t_wait = time.perf_counter()
    assert state.samples == ph.epoch_samples, (state.samples, ph.epoch_samples)  # loader contract, on all ranks
    return True


def synchronise(ph: Phases, state: TrainState):
    """The one host read of the step accumulators (stacked all-reduce); stops a diverged run before any save."""
    sigterm, drain = ph.preemption.flags()
    synced = ph.stats.sync(sigterm, drain)
    check_divergence(ph.cfg, synced, ph.stats, state)
    state.skipped_steps += synced.skipped
    ph.corrupt += synced.corrupt
    ph.progress.emit(state, synced, ph.strategy.lr())
    return synced


def after_step(ph: Phases, state: TrainState) -> bool:
    """Synchronise at the log cadence, checkpoints and the epoch end; take the checkpoints due. False: stop."""
    run = ph.cfg.run
    end = state.samples == ph.epoch_samples
    stopping = run.stop_after_steps is not None and state.step >= run.stop_after_steps
    periodic = state.step % run.checkpoint_every_steps == 0 and not end  # the epoch end has its own checkpoint
    if not (end or stopping or periodic or state.step % run.log_every_steps == 0):
        return True
    synced = synchronise(ph, state)
    if synced.sigterm or synced.drain:  # checkpoint, then end the attempt as a preemption (distributed/preemption.py)
        if rank_and_world()[0] == 0:
            why = "a rank got SIGTERM" if synced.sigterm else "Ray is draining a node of this run"
            print(f"rank 0: {why}; checkpoint at step {state.step}", flush=True)
        ph.report("recovery", {"corrupt_train": ph.corrupt}, wait=True)
        ph.preemption.stand_down(state.step)
    if stopping or periodic:
        ph.report("recovery", {"corrupt_train": ph.corrupt})
    return not stopping


@torch.no_grad()
def evaluate(ph: Phases, loader, module=None, lockstep: bool = False) -> dict:
    """Top-1/top-5 over the whole val split (`loader`: data.eval_loader, the loader jobs.evaluate uses): exact
    counts summed over ranks, nothing dropped or doubled.

    `module`: other weights to evaluate (the EMA); default the trained model. No host read per batch.
    """
    cfg, strategy = ph.cfg, ph.strategy
    strategy.train(False)
    tally = AccuracyTally(ph.num_classes, ph.device)
    batches = rng_neutral(loader)
    n_batches = len(loader)
    if lockstep:  # ZeRO-3 gathers weights collectively: every rank must run as many forwards
        most = torch.tensor([n_batches], device=ph.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        n_batches = int(most.item())
    for _ in range(n_batches):
        batch = next(batches, None)
        if batch is None:  # this rank is done; keep the collective in step with a throwaway forward
            strategy.eval_forward(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size, device=ph.device))
            continue
        batch = device_batch(batch, ph.device, cfg.data.image_size, cfg.model.channels_last)
        tally.corrupt += len(batch["corrupt"])
        tally.add_logits(split_outputs(strategy.eval_forward(batch["image"], module))[0], batch["label"])
    tally.all_reduce()
    t = tally.totals()
    if t["samples"] == 0:
        raise RuntimeError(f"evaluation saw no images in {cfg.data.url} (val split)")
    return {"val_top1": t["top1"], "val_top5": t["top5"], "val_loss": t["loss"], "val_samples": t["samples"],
            "corrupt_val": t["corrupt"]}
