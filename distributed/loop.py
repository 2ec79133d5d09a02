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
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from data import ShardFormatError, build_loader, normalize
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
    batch: int = 0  # batches of `epoch` already trained: the data position
    step: int = 0  # batches trained since the start of the run
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
    steps_per_epoch: int
    num_classes: int
    report: Callable[..., None]  # report(role, values, wait=False); distributed.reporting.Reporter in Ray
    preemption: Any  # .flags() -> (sigterm, drain), .stand_down(step); distributed.preemption.Preemption in Ray
    progress: Progress
    stats: StepStats
    corrupt: int = 0  # corrupt training images of this epoch, all ranks (as of the last synchronisation)


def train_loader(cfg: Config, rank: int, world: int):
    """The loop's one use of the training loader API: built once per worker (the data index is read once);
    `epoch_batches` positions it at an epoch and batch."""
    return build_loader(
        cfg.data.url, "train", batch_size=cfg.data.batch_size, rank=rank, world_size=world, train=True,
        image_size=cfg.data.image_size, num_workers=cfg.data.loader_workers, seed=cfg.run.seed, epoch=0,
        start_batch=0, shuffle_buffer=cfg.data.shuffle_buffer, auto_augment=cfg.data.auto_augment,
        crop_scale=tuple(cfg.data.crop_scale), max_corrupt_fraction=cfg.data.max_corrupt_fraction)


def epoch_batches(loader, epoch: int, start_batch: int):
    """This rank's batches of `epoch` from `start_batch` on."""
    loader.dataset.set_epoch(epoch, start_batch)
    return loader


def val_loader(cfg: Config, rank: int, world: int):
    """This rank's share of the val split, built once per worker and iterated at every evaluation."""
    return build_loader(cfg.data.url, "val", batch_size=cfg.data.eval_batch_size, rank=rank, world_size=world,
                        train=False, image_size=cfg.data.image_size, num_workers=cfg.data.loader_workers,
                        seed=cfg.run.seed, epoch=0, max_corrupt_fraction=cfg.data.max_corrupt_fraction)


def iterate(loader):
    """The loader's iterator, made without a draw from the training RNG: a DataLoader draws its workers' base seed
    from the global generator, which would shift a resumed run's dropout masks against the uninterrupted run's."""
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def steps_per_epoch(train_samples: int, cfg: Config, world: int) -> int:
    return train_samples // world // cfg.data.batch_size


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
    """Train from `state.batch` to the end of the epoch; False when stopped early by run.stop_after_steps.

    On SIGTERM or a drain notice it checkpoints and hands over to `preemption.stand_down`, which does not return.
    """
    cfg, strategy = ph.cfg, ph.strategy
    strategy.train(True)
    t_wait = time.perf_counter()
    for batch in iterate(loader):
        wait = time.perf_counter() - t_wait
        check_labels(batch, ph.num_classes, cfg.data.url)
        images = normalize(batch["image"], device=ph.device, channels_last=cfg.model.channels_last)
        labels = batch["label"].to(ph.device, non_blocking=True)
        strategy.set_lr(lr_at(cfg, state.optimizer_steps, ph.steps_per_epoch))
        loss = compute_loss(cfg, strategy.forward(images), labels)
        applied = strategy.step(loss)
        state.step += 1
        state.batch += 1
        strategy.after_step(state.step)
        ph.stats.add(loss, applied, len(batch["corrupt"]))
        ph.progress.add(len(batch["label"]), wait)
        if not after_step(ph, state):
            return False
        t_wait = time.perf_counter()
    assert state.batch == ph.steps_per_epoch, (state.batch, ph.steps_per_epoch)  # loader contract: equal on all ranks
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
    end = state.batch == ph.steps_per_epoch
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
    """Top-1/top-5 over the whole val split: exact counts summed over ranks, nothing dropped or doubled.

    `module`: other weights to evaluate (the EMA); default the trained model. No host read per batch.
    """
    cfg, strategy = ph.cfg, ph.strategy
    strategy.train(False)
    tally = AccuracyTally(ph.num_classes, ph.device)
    batches = iterate(loader)
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
        tally.corrupt += len(batch["corrupt"])
        images = normalize(batch["image"], device=ph.device, channels_last=cfg.model.channels_last)
        labels = batch["label"].to(ph.device, non_blocking=True)
        tally.add_logits(split_outputs(strategy.eval_forward(images, module))[0], labels)
    tally.all_reduce()
    t = tally.totals()
    if t["samples"] == 0:
        raise RuntimeError(f"evaluation saw no images in {cfg.data.url} (val split)")
    return {"val_top1": t["top1"], "val_top5": t["top5"], "val_loss": t["loss"], "val_samples": t["samples"],
            "corrupt_val": t["corrupt"]}
