"""The loop's phases in-process, without Ray (distributed/loop.py takes its report and preemption seams as
arguments): host synchronisations counted, the fp16 path on CPU (autocast + GradScaler), EMA, clipping,
channels_last, the lr schedule by optimizer steps taken, divergence, and BatchNorm statistics averaged across
two gloo ranks before a checkpoint."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket

import pytest
import torch
from torch import nn

from distributed import checkpoint as ckpt
from distributed.config import load_config
from distributed.loop import Phases, TrainState, evaluate, train_one_epoch
from distributed.loss import NonFiniteLossError
from distributed.monitor import Progress, StepStats
from distributed.optim import WeightEma, lr_at, peak_lr
from distributed.preemption import NoPreemption
from distributed.strategies import DDPStrategy

NUM_CLASSES = 3


class TinyNet(nn.Module):
    """Conv + BN + dropout: the parts whose behaviour the loop must get right, at a cost of milliseconds."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))


def batches(n: int, seed: int, size: int = 16, b: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (b,), generator=gen), "key": [f"k{i}" for i in range(b)],
             "corrupt": []} for _ in range(n)]


class ListLoader:
    """TrainLoader's interface over a list of batches: `epoch(epoch, start_step)` yields the batches from there."""

    world = 1

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def epoch(self, epoch: int, start_step: int = 0):
        return iter(self.batches[start_step:])


def config(*extra: str):
    return load_config("configs/demo.yaml", ["data.image_size=16", "data.global_batch_size=4", "run.num_workers=1",
                                             "schedule.epochs=2", "schedule.warmup_epochs=0.5",
                                             "run.checkpoint_every_steps=100", "run.log_every_steps=4", *extra])


class Recorder:
    """A report seam: remembers (role, step, values) instead of saving and calling Ray."""

    def __init__(self, state):
        self.state, self.calls = state, []

    def __call__(self, role, values, wait=False):
        self.calls.append((role, self.state.step, values))


def phases(cfg, strategy, state, spe: int, report=None) -> Phases:
    return Phases(cfg, strategy, torch.device("cpu"), spe, NUM_CLASSES, report or Recorder(state), NoPreemption(),
                  Progress(cfg, 1, cfg.schedule.epochs * spe), StepStats(torch.device("cpu"), state.step))


@contextlib.contextmanager
def count_host_reads():
    """Count every call that makes the host wait for the device: item, tolist, bool/int/float, synchronize."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            counts["n"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    sync = torch.cuda.synchronize
    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counting(original))
        torch.cuda.synchronize = counting(sync)
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.cuda.synchronize = sync


def test_one_host_read_per_log_interval_on_the_fp16_path():
    """fp16 (CPU autocast + GradScaler + fused SGD), EMA, clipping and channels_last: 8 steps logged every 4 read
    the device twice; an evaluation once, whatever its number of batches."""
    cfg = config("strategy.precision=fp16", "optim.name=sgd", "optim.ema_decay=0.999", "optim.ema_steps=1",
                 "optim.grad_clip_norm=1.0", "model.channels_last=true")
    torch.manual_seed(0)
    strategy = DDPStrategy(cfg, TinyNet(), torch.device("cpu"), steps_per_epoch=8)
    assert strategy.scaler is not None and strategy.optimizer.defaults["fused"]
    state = TrainState()
    ph = phases(cfg, strategy, state, 8)
    ema_before = [p.clone() for p in strategy.ema.module.parameters()]
    with count_host_reads() as counts:
        assert train_one_epoch(ph, state, ListLoader(batches(8, seed=1)))
    assert counts["n"] == 2 and state.step == 8
    with count_host_reads() as counts:
        result = evaluate(ph, batches(5, seed=2))
    assert counts["n"] == 1 and result["val_samples"] == 20
    assert 0 <= result["val_top1"] <= result["val_top5"] <= 1 and math.isfinite(result["val_loss"])
    assert strategy.module.fc.weight.dtype == torch.float32  # fp32 master weights under fp16 autocast
    assert all(b.dtype in (torch.float32, torch.int64) for b in strategy.module.buffers())  # BN stays fp32
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, strategy.ema.module.parameters()))
    assert state.optimizer_steps + state.skipped_steps == 8  # skips (if the initial scale overflowed) are counted


class ScriptedStrategy:
    """A strategy whose steps apply or skip as scripted, recording the lr it was given before each."""

    ema = None

    def __init__(self, applied: list[int], losses: list[float]):
        self.applied, self.losses, self.lrs, self.module = list(applied), list(losses), [], nn.Linear(1, 1)

    def train(self, mode=True):
        pass

    def set_lr(self, lr):
        self.lrs.append(lr)

    def lr(self):
        return self.lrs[-1]

    def forward(self, images):
        return torch.zeros(len(images), NUM_CLASSES, requires_grad=True)

    def step(self, loss):
        return torch.tensor(float(self.applied.pop(0)))

    def after_step(self, step):
        pass


def test_lr_advances_by_optimizer_steps_taken(monkeypatch):
    """Skipped fp16 steps do not advance the schedule; the loop learns of them at the next read (every 2 here)."""
    cfg = config("strategy.precision=fp16", "run.log_every_steps=2", "schedule.warmup_epochs=1")
    applied = [1, 0, 0, 1, 1, 1, 0, 1]
    strategy = ScriptedStrategy(applied, [1.0] * 8)
    state = TrainState()
    assert train_one_epoch(phases(cfg, strategy, state, 8), state, ListLoader(batches(8, seed=0)))
    # Reads after steps 2, 4, 6, 8: skipped totals 1, 2, 2, 3 known from then on.
    known_skips = [0, 0, 1, 1, 2, 2, 2, 2]
    assert strategy.lrs == pytest.approx([lr_at(cfg, s - k, 8) for s, k in enumerate(known_skips)])
    assert state.skipped_steps == 3 and state.optimizer_steps == 5
    assert lr_at(cfg, 7, 8) == pytest.approx(peak_lr(cfg))  # the warm-up ends after one epoch of applied steps


def test_a_nan_loss_stops_the_run_naming_its_step(monkeypatch):
    cfg = config("run.log_every_steps=4")
    strategy = ScriptedStrategy([1] * 8, [])
    import distributed.loop as loop

    losses = iter([1.0, 1.0, float("nan"), 1.0, 1.0])
    monkeypatch.setattr(loop, "compute_loss", lambda cfg, out, labels: torch.tensor(next(losses)))
    state = TrainState()
    report = Recorder(state)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 3 "):
        train_one_epoch(phases(cfg, strategy, state, 8, report), state, ListLoader(batches(8, seed=0)))
    assert state.step == 4 and report.calls == []  # found at the first read, before any checkpoint


def test_weight_ema_follows_torchvision():
    cfg = config("optim.ema_decay=0.99998", "optim.ema_steps=32", "schedule.epochs=600",
                 "data.global_batch_size=1024", "run.num_workers=8", "schedule.warmup_epochs=1")
    model = TinyNet()
    ema = WeightEma(cfg, model, steps_per_epoch=64)
    # torchvision: adjust = world * batch (= G) * ema_steps / epochs; alpha = min(1, (1 - decay) * adjust)
    assert ema.decay == pytest.approx(1 - (1 - 0.99998) * 8 * 128 * 32 / 600)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.after_step(model, 32)  # inside the warm-up (64 steps): a copy
    assert torch.equal(ema.module.fc.weight, model.fc.weight)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.after_step(model, 33)  # not an update step
    ema.after_step(model, 96)  # after the warm-up: a moving average
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)
    expected = model.fc.weight - 1.0 + (1 - ema.decay) * 1.0
    torch.testing.assert_close(ema.module.fc.weight, expected)


# -- two gloo ranks: BN statistics and RNG states --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from distributed.comm import seed_rank
    from distributed.reporting import Reporter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = config("run.num_workers=2", "run.stop_after_steps=3")
    torch.manual_seed(0)
    strategy = DDPStrategy(cfg, TinyNet(), torch.device("cpu"), steps_per_epoch=4)
    seed_rank(cfg.run.seed, rank)
    state = TrainState()

    def send(metrics, directory, name, wait):  # instead of ray.train.report: keep rank 0's checkpoint
        if directory is not None:
            shutil.copytree(directory, os.path.join(out, name))

    reporter = Reporter(cfg, strategy, state, torch.device("cpu"), send=send)
    ph = phases(cfg, strategy, state, 4, reporter)
    assert not train_one_epoch(ph, state, ListLoader(batches(4, seed=10 + rank)))  # different data per rank: other BN stats
    torch.save({k: v for k, v in strategy.module.state_dict().items() if "running" in k},
               os.path.join(out, f"bn.rank{rank}.pt"))
    dist.destroy_process_group()


def test_bn_statistics_are_averaged_before_a_checkpoint(tmp_path):
    """Three steps on two ranks with different data, then a checkpoint: both ranks hold the same BN statistics and
    the checkpoint holds them; each rank's RNG state is saved, and they differ (seed + rank)."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"bn.rank{r}.pt", weights_only=True) for r in (0, 1))
    directory = tmp_path / ckpt.checkpoint_dir_name(3)  # the checkpoint of run.stop_after_steps=3
    saved = ckpt.load_state(directory)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        torch.testing.assert_close(saved["model"][key], a[key], rtol=0, atol=0)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    assert saved["step"] == 3 and ckpt.read_meta(str(directory)) == {
        "format_version": 1, "role": "recovery", "step": 3, "epoch": 0, "samples": 12, "score": None,
        "metric": "val_top1", "order": None}  # the Ray worker passes the order's fingerprint; this test none


DEEPSPEED_FP16 = """
import os, sys, torch
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
from distributed.config import load_config
from distributed.strategies import DeepSpeedStrategy
from tests.test_loop import TinyNet
cfg = load_config("configs/demo.yaml", ["strategy.name=deepspeed", "strategy.precision=fp16", "run.num_workers=1",
                                        "data.global_batch_size=4", "optim.grad_clip_norm=1.0"])
torch.manual_seed(0)
strategy = DeepSpeedStrategy(cfg, TinyNet(), torch.device("cpu"), steps_per_epoch=4)
x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
for factor in (1.0, 1e30, 1.0):  # the middle step overflows the fp16 gradients
    loss = torch.nn.functional.cross_entropy(strategy.forward(x).float(), y) * factor
    print("applied", float(strategy.step(loss)), "scale", strategy._scaler().get_scale(), flush=True)
print("dtypes", sorted({{str(t.dtype) for t in strategy.module.state_dict().values()}}))
"""


@pytest.mark.slow  # DeepSpeed's import takes 10-60 s
def test_deepspeed_stage0_fp16_skips_an_overflow_on_the_device_and_keeps_fp32_weights():
    import subprocess
    import sys

    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_FP16.format(port=_free_port())], env=env, timeout=300,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("applied", "dtypes"))]
    assert lines == ["applied 1.0 scale 65536.0", "applied 0.0 scale 32768.0", "applied 1.0 scale 32768.0",
                     "dtypes ['torch.float32', 'torch.int64']"]
