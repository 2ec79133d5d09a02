"""Checkpoints and their reports to Ray Train, without stopping training.

`Reporter(role, values)`: every rank averages its BatchNorm statistics with the others (so all hold and save one
model), the per-rank RNG states are gathered to rank 0, every rank saves its part into a fresh local directory
(rank 0 adds `meta.json`; each writer its manifest, last) and calls `ray.train.report` (a barrier) with
`checkpoint_upload_mode=ASYNC`: Ray uploads in the background and deletes the local directory afterwards, while
the step loop goes on. A preemption checkpoint is uploaded before the call returns (`wait=True`), since the
process is about to end. Roles (timm's split): "recovery" checkpoints are reported with the score -1, below any
accuracy, so Ray's retention (`run.num_to_keep` by score, plus always the latest) never drops a scored checkpoint
for one; "evaluated" ones carry the epoch's val top-1 of the scored weights (`run.checkpoint_score`).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from distributed import checkpoint as ckpt
from distributed.comm import gather_rng_states, rank_and_world, reduce_bn
from distributed.config import Config

SCORE = "score"  # the metric Ray's CheckpointConfig ranks checkpoints by
# Below every accuracy. Not -inf, which Ray ranks lower still: its checkpoint_manager_snapshot.json (pydantic)
# writes -inf as null, and the checkpoint manager of the next launch fails comparing None with a number.
RECOVERY_SCORE = -1.0


def score_metric(cfg: Config) -> str:
    """The val metric that scores an evaluated checkpoint: raw or EMA weights' top-1."""
    return "val_ema_top1" if cfg.run.checkpoint_score == "ema" else "val_top1"


def ray_report(metrics: dict, directory: str | None, name: str, wait: bool) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None,
                     checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.SYNC if wait else CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)


class Reporter:
    """report(role, values, wait=False): a checkpoint of the current state, reported on every rank."""

    def __init__(self, cfg: Config, strategy, state, device: torch.device, metrics=None, extra: dict | None = None,
                 checkpoint_name: Callable[[int], str] = ckpt.checkpoint_dir_name, send: Callable = ray_report):
        self.cfg, self.strategy, self.state, self.device = cfg, strategy, state, device
        self.metrics, self.extra, self.checkpoint_name, self.send = metrics, extra or {}, checkpoint_name, send
        self.bn_reduced_at = -1

    def sync_bn(self) -> None:
        """Average BN statistics across ranks once per step reached (before evaluations and checkpoints)."""
        if self.bn_reduced_at != self.state.step:
            ema = self.strategy.ema.module if self.strategy.ema is not None else None
            reduce_bn(self.strategy.module, ema)
            self.bn_reduced_at = self.state.step

    def __call__(self, role: str, values: dict, wait: bool = False) -> None:
        rank, world = rank_and_world()
        t0 = time.perf_counter()
        self.sync_bn()
        rngs = gather_rng_states(self.device)
        state = self.state
        payload = {**dataclasses.asdict(state), "config": self.cfg.to_dict(), "rng": rngs, **self.extra}
        metric = score_metric(self.cfg)
        score = values[metric] if role == "evaluated" else None
        directory = tempfile.mkdtemp(prefix="ckpt-")  # fresh each time: Ray deletes it after the upload
        self.strategy.save(Path(directory), payload, rank)
        writes = rank < self.strategy.checkpoint_writers
        if rank == 0:
            ckpt.write_meta(directory, role=role, step=state.step, epoch=state.epoch, samples=state.samples,
                            score=score, metric=metric, order=self.extra.get("order"))
        if writes:
            ckpt.write_manifest(directory, rank, world, writers=self.strategy.checkpoint_writers)
        else:
            Path(directory).rmdir()
        if self.metrics is not None:
            self.metrics.flush()
        name = self.checkpoint_name(state.step)
        self.send({"epoch": state.epoch, "step": state.step, "role": role,
                   SCORE: score if score is not None else RECOVERY_SCORE, **values},
                  directory if writes else None, name, wait)
        if self.metrics is not None:
            self.metrics.log({"kind": "checkpoint", "epoch": state.epoch, "step": state.step, "role": role,
                              "name": name, "save_s": time.perf_counter() - t0, "time": time.time()})
