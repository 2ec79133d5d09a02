"""The function Ray Train runs on every rank: set up, restore the newest good checkpoint, then epochs of
`train_one_epoch`, evaluation (raw and EMA weights) and an evaluated checkpoint (distributed/loop.py phases)."""
from __future__ import annotations

import os
import time

import ray.train
import ray.train.torch
import torch

from data import TrainLoader, eval_loader
from distributed.comm import rank_and_world, restore_rng, seed_rank
from distributed.config import Config, config_from_dict, per_rank_batch
from distributed.loop import Phases, SampleLog, TrainState, evaluate, stream_options, train_one_epoch
from distributed.model import build_model
from distributed.monitor import Progress, StepStats
from distributed.preemption import Preemption, install_sigterm_handler
from distributed.reporting import Reporter, score_metric
from distributed.resume import Resume, check_resumable, resolve_checkpoint
from distributed.run_folder import RunFolder
from distributed.strategies import build_strategy
from distributed.tracking import metrics_log


def configure_runtime(cfg: Config, device: torch.device) -> None:
    """Threads on CPU; on GPU cudnn.benchmark and TF32 unless run.deterministic (docs/training.md, GPU checklist)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # picks the fastest conv algorithms for the fixed input shapes
    if device.type == "cuda":
        tf32 = cfg.strategy.tf32 and not cfg.run.deterministic
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def restore(cfg: Config, strategy, state: TrainState, run_uri: str, device: torch.device,
            order: dict) -> tuple[Resume, str]:
    """Restore everything from the run's newest good checkpoint (or `resume_from`); else seed this rank.
    A checkpoint without a global sample position, or of another training `order`, is refused (check_resumable).

    Returns the `Resume` (where from, the names for the next checkpoints) and how the RNG state was set.
    """
    rank, _ = rank_and_world()
    latest = ray.train.get_checkpoint()
    latest_name = os.path.basename(latest.path.rstrip("/")) if latest is not None else None
    local_rank = ray.train.get_context().get_local_rank()
    with resolve_checkpoint(run_uri, cfg.resume_from, latest_name, rank, local_rank) as resume:
        if resume.directory is None:
            seed_rank(cfg.run.seed, rank)
            return resume, "seed+rank"
        saved = strategy.load(resume.directory)
    check_resumable(saved, order, resume.source)
    state.restore(saved)
    return resume, restore_rng(saved.get("rng"), cfg.run.seed, state.step, device)


def end_of_epoch(ph: Phases, state: TrainState, reporter: Reporter, metrics, val, lockstep: bool) -> None:
    """Evaluate the raw weights (and the EMA's) on the `val` loader, log, and report the evaluated checkpoint."""
    cfg = ph.cfg
    reporter.sync_bn()
    result = evaluate(ph, val, lockstep=lockstep)
    if ph.strategy.ema is not None:
        ema = evaluate(ph, val, module=ph.strategy.ema.module)
        result.update({f"val_ema_{k}": ema[f"val_{k}"] for k in ("top1", "top5", "loss")})
    score = result[score_metric(cfg)]
    state.last_top1 = result["val_top1"]
    if result["val_top1"] >= state.best_top1:
        state.best_top1, state.best_top5 = result["val_top1"], result["val_top5"]
    state.best_score = max(state.best_score, score)
    state.epoch += 1
    state.samples = 0
    if metrics is not None:
        metrics.log({"kind": "eval", "epoch": state.epoch, "step": state.step, **result, "score": score,
                     "corrupt_train": ph.corrupt})
        ema_text = f" (EMA {result['val_ema_top1']:.4f})" if "val_ema_top1" in result else ""
        print(f"epoch {state.epoch}/{cfg.schedule.epochs}: val top-1 {result['val_top1']:.4f}{ema_text} "
              f"top-5 {result['val_top5']:.4f} loss {result['val_loss']:.4f} ({result['val_samples']} images)",
              flush=True)
    reporter("evaluated", {**result, "corrupt_train": ph.corrupt})
    ph.corrupt = 0


def start_attempt(cfg: Config, config: dict, state: TrainState, resume: Resume, rng: str, params: int, spe: int):
    """Rank 0: record the attempt (with its shape: ranks, per-rank batch, loader workers) in attempts.jsonl and
    open the metrics log; returns it (None on other ranks)."""
    rank, world = rank_and_world()
    if rank != 0:
        return None
    run = RunFolder(config["run_uri"])
    attempts = run.read_jsonl("attempts.jsonl")
    metrics = metrics_log(cfg, run, len(attempts), state.step)  # MLflow too with tracking.backend
    run.write_jsonl("attempts.jsonl", attempts + [{
        "launch_id": config["launch_id"], "time": time.time(), "restored_from": resume.source,
        "restored_step": state.step, "rng": rng, "params": params, "world_size": world,
        "global_batch_size": cfg.data.global_batch_size, "loader_workers": cfg.data.loader_workers}])
    print(f"rank 0: {cfg.model.name} ({params:,} params), {world} workers x {per_rank_batch(cfg, world)} = global "
          f"batch {cfg.data.global_batch_size}, {spe} steps/epoch, start at epoch {state.epoch} sample "
          f"{state.samples} (step {state.step}, from {resume.source})", flush=True)
    return metrics


def train_loop_per_worker(config: dict) -> None:
    cfg = config_from_dict(config["cfg"])
    install_sigterm_handler()
    rank, world = rank_and_world()  # under elastic scaling, the size Ray started this attempt with
    device = ray.train.torch.get_device()
    configure_runtime(cfg, device)
    opts = stream_options(cfg)
    train = TrainLoader(opts, rank, world)  # once per rank: its loader workers persist across epochs
    val = eval_loader(opts, rank, world)  # the loader jobs.evaluate uses: the same top-1 for the same weights
    spe, num_classes = train.steps_per_epoch, train.index.num_classes
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank and every launch
    model = build_model(cfg, num_classes)
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them (numel 0 on every rank)
    strategy = build_strategy(cfg, model, device, spe)
    state = TrainState()
    resume, rng = restore(cfg, strategy, state, config["run_uri"], device, train.fingerprint)
    metrics = start_attempt(cfg, config, state, resume, rng, params, spe)
    reporter = Reporter(cfg, strategy, state, device, metrics,
                        {"launch_id": config["launch_id"], "order": train.fingerprint, "world_size": world},
                        resume.checkpoint_name)
    ph = Phases(cfg, strategy, device, spe, num_classes, reporter, Preemption(),
                Progress(cfg, world, cfg.schedule.epochs * spe, metrics), StepStats(device, state.step),
                sample_log=SampleLog(cfg.run.sample_log, rank) if cfg.run.sample_log else None)
    lockstep = cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 3
    while state.epoch < cfg.schedule.epochs:
        if not train_one_epoch(ph, state, train):
            break
        end_of_epoch(ph, state, reporter, metrics, val, lockstep)
    if metrics is not None:
        metrics.close()
