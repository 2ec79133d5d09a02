"""The per-worker training function that Ray Train runs on every rank, and its phases.

Shape follows torchvision's references/classification/train.py: `train_one_epoch` and `evaluate` are small
functions; `train_loop_per_worker` only wires them together with restore and report. Every rank calls
`ray.train.report` at the same steps (it is a barrier): every `run.checkpoint_every_steps` and each epoch end.

Preemption: SIGTERM to any worker (a spot reclaim, a node shutdown, `kill`) sets a flag; after each step the
ranks all-reduce it, all report a checkpoint at the step reached and raise `PreemptedError`, so Ray Train
restarts the workers from that checkpoint (a failure counted against run.max_failures; a resubmission of the
run resumes from it too). A Ray node drain (`ray.train.get_preemption_info()`, polled every
`run.log_every_steps`) gets one checkpoint and training goes on; Ray restarts the run when the node goes.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import ShardFormatError, build_loader, normalize, read_index
from distributed import checkpoint as ckpt
from distributed.config import Config, ConfigError, config_from_dict
from distributed.loss import check_loss, compute_loss
from distributed.preflight import model_kwargs
from distributed.run_folder import MetricsLog, RunFolder
from distributed.strategies import build_strategy
from distributed.tracking import metrics_log
from models import get_model, split_outputs


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (== epochs when finished)
    batch: int = 0  # batches of `epoch` already trained: the data position
    step: int = 0  # optimizer steps since the start of the run
    best_top1: float = 0.0
    best_top5: float = 0.0
    last_top1: float = 0.0
    skipped_steps: int = 0  # fp16 overflow skips in a row


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class PreemptedError(RuntimeError):
    """A worker got SIGTERM: every rank saved a checkpoint at the step reached and stops, so the run restarts."""


# Signals reach a process, not a run: the flag is process state by nature. Python runs signal handlers on the main
# thread only, which in a Ray Train worker is the actor's, not the training thread; see install_sigterm_handler.
_SIGTERM = threading.Event()
_PREVIOUS_SIGTERM_HANDLER: list = []


def _on_sigterm(signum, frame) -> None:
    if _SIGTERM.is_set():  # a second SIGTERM: give up on the checkpoint, exit as the previous handler would
        signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM_HANDLER[0])
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _SIGTERM.set()


def _install_on_this_thread(*_actor) -> None:
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _PREVIOUS_SIGTERM_HANDLER[:] = [current]
        signal.signal(signal.SIGTERM, _on_sigterm)


def install_sigterm_handler() -> None:
    """Make SIGTERM set the preemption flag instead of exiting (Ray's worker handler exits at once)."""
    _SIGTERM.clear()
    if threading.current_thread() is threading.main_thread():
        _install_on_this_thread()
        return
    # Ray Train runs the training function on a thread of the worker actor; the actor's main thread is free
    # between Ray's status polls and runs this call (it also runs the handler, within a poll interval).
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.__ray_call__.remote(_install_on_this_thread))


def sigterm_on_any_rank(device: torch.device) -> bool:
    """Every rank gets the same answer: one all-reduce of a 1-element flag per step."""
    flag = torch.tensor([1.0 if _SIGTERM.is_set() else 0.0], device=device)
    return all_reduce_sum(flag).item() > 0


def configure_runtime(cfg: Config, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(cfg.run.cpus_per_worker)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def seed_step(cfg: Config, rank: int, step: int) -> None:
    """Dropout masks depend only on (seed, rank, step), so a resumed run draws what the uninterrupted one drew."""
    torch.manual_seed((cfg.run.seed * 1_000_003 + step) * 1024 + rank)


def make_loader(cfg: Config, split: str, rank: int, world: int, epoch: int, start_batch: int = 0):
    train = split == "train"
    return build_loader(
        cfg.data.url, split, batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        rank=rank, world_size=world, train=train, image_size=cfg.data.image_size,
        num_workers=cfg.data.loader_workers, seed=cfg.run.seed, epoch=epoch, start_batch=start_batch,
        shuffle_buffer=cfg.data.shuffle_buffer, auto_augment=cfg.data.auto_augment,
        crop_scale=tuple(cfg.data.crop_scale),
        max_corrupt_fraction=cfg.data.max_corrupt_fraction)


class Progress:
    """A line every `log_every_steps` with loss, lr, images/s, data-wait fraction and ETA (rank 0 prints)."""

    def __init__(self, cfg: Config, world: int, total_steps: int, metrics: MetricsLog | None):
        self.cfg, self.world, self.total, self.metrics = cfg, world, total_steps, metrics
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.images, self.loss_sum, self.n = time.perf_counter(), 0.0, 0, 0.0, 0

    def update(self, state: TrainState, loss: float, batch_images: int, wait: float, lr: float) -> None:
        self.wait += wait
        self.images += batch_images
        self.loss_sum += loss
        self.n += 1
        if state.step % self.cfg.run.log_every_steps == 0 or state.step == self.total:
            self.emit(state, lr)

    def emit(self, state: TrainState, lr: float) -> None:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        record = {"kind": "train", "epoch": state.epoch, "step": state.step, "loss": self.loss_sum / self.n,
                  "lr": lr, "images_per_s": self.images * self.world / elapsed, "data_wait": self.wait / elapsed,
                  "time": time.time()}
        eta = (self.total - state.step) * elapsed / self.n
        if self.metrics is not None:
            self.metrics.log(record)
            print(f"epoch {state.epoch + 1}/{self.cfg.schedule.epochs} step {state.step}/{self.total} "
                  f"loss {record['loss']:.4f} lr {lr:.4g} {record['images_per_s']:.1f} img/s "
                  f"data-wait {100 * record['data_wait']:.0f}% eta {eta / 60:.1f} min", flush=True)
        self.reset()


def check_labels(batch: dict, num_classes: int, url: str) -> None:
    """Labels must lie in [0, num_classes): elsewhere the loss fails obscurely (a device-side assert on GPU)."""
    labels = batch["label"]
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ShardFormatError(f"{url}: training sample {batch['key'][i]!r} has label {int(labels[i])}, but the index "
                               f"has {num_classes} classes (0-{num_classes - 1}); re-run jobs.prepare")


def train_one_epoch(cfg, strategy, state, loader, progress, report, steps_per_epoch, device,
                    drain: dict, num_classes: int) -> tuple[bool, int]:
    """Train from `state.batch` to the end of the epoch.

    Returns (finished, corrupt images skipped); finished is False when stopped by run.stop_after_steps.
    Raises PreemptedError after the checkpoint when any rank got SIGTERM. `drain` remembers a Ray node drain.
    """
    rank, _ = rank_and_world()
    strategy.train(True)
    corrupt = 0
    t_wait = time.perf_counter()
    for batch in loader:
        wait = time.perf_counter() - t_wait
        if cfg.run.deterministic:
            seed_step(cfg, rank, state.step)
        check_labels(batch, num_classes, cfg.data.url)
        images = normalize(batch["image"], device=device, channels_last=cfg.model.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        loss = compute_loss(cfg, strategy.forward(images), labels)
        applied = strategy.step(loss)
        value = check_loss(cfg, loss, applied, state)
        state.step += 1
        state.batch += 1
        corrupt += len(batch["corrupt"])
        progress.update(state, value, len(labels), wait, strategy.lr())
        stopping = cfg.run.stop_after_steps is not None and state.step >= cfg.run.stop_after_steps
        preempted = sigterm_on_any_rank(device)
        periodic = state.step % cfg.run.checkpoint_every_steps == 0 and state.batch < steps_per_epoch
        if not drain["saved"] and state.step % cfg.run.log_every_steps == 0 \
                and ray.train.get_preemption_info() is not None:  # a barrier too: same steps on every rank
            drain["saved"] = True
            periodic = state.batch < steps_per_epoch  # at an epoch's end, its own checkpoint follows the evaluation
            if rank == 0:
                print(f"rank 0: Ray is draining a node of this run; checkpoint at step {state.step}", flush=True)
        if stopping or preempted or periodic:
            report({"corrupt_train": corrupt})
        if preempted:
            raise PreemptedError(f"SIGTERM: saved a checkpoint at step {state.step} (epoch {state.epoch}, batch "
                                 f"{state.batch}); stopping so the run restarts from it")
        if stopping:
            return False, corrupt
        t_wait = time.perf_counter()
    assert state.batch == steps_per_epoch, (state.batch, steps_per_epoch)  # loader contract: equal on all ranks
    return True, corrupt


@torch.no_grad()
def evaluate(cfg: Config, strategy, loader, device: torch.device, lockstep: bool) -> dict:
    """Top-1/top-5 over the whole val split: exact counts summed over ranks, nothing dropped or doubled."""
    strategy.train(False)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, loss, count, corrupt
    batches = iter(loader)
    n_batches = len(loader)
    if lockstep:  # ZeRO-3 gathers weights collectively: every rank must run as many forwards
        most = torch.tensor([n_batches], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        n_batches = int(most.item())
    for _ in range(n_batches):
        batch = next(batches, None)
        if batch is None:  # this rank is done; keep the collective in step with a throwaway forward
            strategy.eval_forward(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size, device=device))
            continue
        images = normalize(batch["image"], device=device, channels_last=cfg.model.channels_last)
        labels = batch["label"].to(device)
        logits = split_outputs(strategy.eval_forward(images))[0].float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        # Accumulated on the device: no host sync per batch (five .item() calls would stall a GPU each batch).
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             F.cross_entropy(logits, labels, reduction="sum"),
                             torch.tensor(len(labels), device=device),
                             torch.tensor(len(batch["corrupt"]), device=device)]).to(torch.float64)
    all_reduce_sum(sums)
    top1, top5, loss, count, corrupt = sums.tolist()
    if count == 0:
        raise RuntimeError(f"evaluation saw no images in {cfg.data.url} (val split)")
    return {"val_top1": top1 / count, "val_top5": top5 / count, "val_loss": loss / count,
            "val_samples": int(count), "corrupt_val": int(corrupt)}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def make_reporter(cfg: Config, strategy, state: TrainState, metrics: MetricsLog | None, extra: dict,
                  checkpoint_name=ckpt.checkpoint_dir_name):
    """report(metrics): every rank saves its part of the checkpoint and calls ray.train.report (a barrier).

    Rank 0 logs a "checkpoint" record with save_s: local save, manifest, upload and the barrier.
    """
    rank, world = rank_and_world()

    def report(values: dict) -> None:
        payload = {"epoch": state.epoch, "batch": state.batch, "step": state.step, "best_top1": state.best_top1,
                   "best_top5": state.best_top5, "last_top1": state.last_top1, "config": cfg.to_dict(),
                   "rng": rng_state(), **extra}
        writes = rank < strategy.checkpoint_writers
        if metrics is not None:
            metrics.flush()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
            strategy.save(Path(d), payload, rank)
            if writes:
                ckpt.write_manifest(d, rank, world, writers=strategy.checkpoint_writers)
            ray.train.report(
                {"epoch": state.epoch, "step": state.step, "val_top1": state.last_top1, **values},
                checkpoint=ray.train.Checkpoint.from_directory(d) if writes else None,
                checkpoint_dir_name=checkpoint_name(state.step))
        if metrics is not None:
            metrics.log({"kind": "checkpoint", "epoch": state.epoch, "step": state.step,
                         "save_s": time.perf_counter() - t0, "time": time.time()})

    return report


def restore(cfg: Config, strategy, state: TrainState):
    """Restore everything from the run's newest good checkpoint (or `resume_from`).

    Returns the `Resume` (where from, and the names for the next checkpoints); its local copy is gone by then.
    """
    from distributed.resume import resolve_checkpoint

    with resolve_checkpoint(cfg) as resume:
        if resume.directory is None:
            return resume
        saved = strategy.load(resume.directory)
    for f in dataclasses.fields(TrainState):
        if f.name in saved:
            setattr(state, f.name, saved[f.name])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return resume


def train_loop_per_worker(config: dict) -> None:
    cfg = config_from_dict(config["cfg"])
    install_sigterm_handler()
    rank, world = rank_and_world()
    device = ray.train.torch.get_device()
    configure_runtime(cfg, device)
    index = read_index(cfg.data.url)
    train_samples = index.splits["train"].samples
    steps_per_epoch = train_samples // world // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {world} workers exceeds the "
                          f"{train_samples} training samples in {cfg.data.url}")
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank and every launch
    model = get_model(cfg.model.name, **model_kwargs(cfg, len(index.classes), cfg.data.url))
    params = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(cfg, model, device, steps_per_epoch)
    state = TrainState()
    resume = restore(cfg, strategy, state)
    source = resume.source
    run = RunFolder(config["run_uri"])
    metrics = metrics_log(cfg, run, state.step) if rank == 0 else None  # MLflow too with tracking.backend
    if rank == 0:
        attempts = run.read_jsonl("attempts.jsonl") + [{
            "launch_id": config["launch_id"], "time": time.time(), "restored_from": source,
            "restored_step": state.step, "params": params, "world_size": world}]
        run.write_jsonl("attempts.jsonl", attempts)
        print(f"rank 0: {cfg.model.name} ({params:,} params), {world} workers, {steps_per_epoch} steps/epoch, "
              f"start at epoch {state.epoch} batch {state.batch} (step {state.step}, from {source})", flush=True)
    total = cfg.schedule.epochs * steps_per_epoch
    progress = Progress(cfg, world, total, metrics)
    report = make_reporter(cfg, strategy, state, metrics, {"launch_id": config["launch_id"]}, resume.checkpoint_name)
    drain = {"saved": False}
    lockstep = cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 3
    while state.epoch < cfg.schedule.epochs:
        loader = make_loader(cfg, "train", rank, world, state.epoch, state.batch)
        finished, corrupt = train_one_epoch(cfg, strategy, state, loader, progress, report, steps_per_epoch, device,
                                            drain, len(index.classes))
        if not finished:
            break
        corrupt_train = int(all_reduce_sum(torch.tensor([float(corrupt)], device=device)).item())
        result = evaluate(cfg, strategy, make_loader(cfg, "val", rank, world, 0), device, lockstep)
        state.last_top1 = result["val_top1"]
        if result["val_top1"] >= state.best_top1:
            state.best_top1, state.best_top5 = result["val_top1"], result["val_top5"]
        state.epoch += 1
        state.batch = 0
        if metrics is not None:
            metrics.log({"kind": "eval", "epoch": state.epoch, "step": state.step, **result,
                         "corrupt_train": corrupt_train})
            print(f"epoch {state.epoch}/{cfg.schedule.epochs}: val top-1 {result['val_top1']:.4f} "
                  f"top-5 {result['val_top5']:.4f} loss {result['val_loss']:.4f} "
                  f"({result['val_samples']} images)", flush=True)
        report({**result, "corrupt_train": corrupt_train})
    if metrics is not None:
        metrics.close()


def summarize_attempts(run: RunFolder, launch_id: str) -> dict:
    attempts = [a for a in run.read_jsonl("attempts.jsonl") if a["launch_id"] == launch_id]
    return {"failures_survived": max(0, len(attempts) - 1),
            "params": attempts[-1]["params"] if attempts else None,
            "started_from": attempts[0]["restored_from"] if attempts else None}

