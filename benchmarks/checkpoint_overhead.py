"""Checkpoint overhead as a fraction of training time, at the demo scale and at a simulated GPU step time.

    python -m benchmarks.checkpoint_overhead --json [--per-class 160] [--every 4] [--fake-step-s 0.1]

configs/demo.yaml (se_googlenet, DDP, 2 Ray workers on a local Ray on 127.0.0.1, 64 px, global batch 32: 16 per worker) for
one epoch of a generated 5-class sample, a metrics record per step. Two scenarios:

- demo: the real model on the CPUs;
- fake_gpu: the same model, checkpoints and data, but its forward sleeps `--fake-step-s` instead of computing
  (every parameter still gets a gradient, so the optimizer state and the checkpoint have their real size): the
  step time of a GPU, with the host free while the device computes.

Each scenario runs twice: with a checkpoint every `--every` steps and without periodic checkpoints (the epoch-end
checkpoint only). From the metrics: train_s, the time from the first to the last training step;
excess_s, what the steps followed by a checkpoint took beyond the median step (the training thread's whole stall:
saving, uploading or queueing, metrics, the report barrier); overhead = excess_s / (train_s - excess_s);
wall_overhead = train_s(with) / train_s(without) - 1 (noisy on a shared machine).

The same file measures the code before asynchronous checkpoints (main at e127f63, whose metrics are one
metrics.jsonl): copy it into a worktree of that commit and run it there. About 5 minutes on 2 idle cores.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import types

CONFIG = "configs/demo.yaml"
MODEL = "se_googlenet"
FAKE_STEP_S_ENV = "BENCH_FAKE_STEP_S"


def _fake_forward(self, x):
    time.sleep(float(os.environ[FAKE_STEP_S_ENV]))  # the device's compute; the host waits, as for a GPU
    touch = sum(p.sum() for p in self.parameters()) * 0.0  # zero gradients everywhere: real optimizer state
    return x.new_zeros(x.shape[0], self.fc.out_features) + touch


def fake_gpu_worker(config: dict) -> None:
    """The project's per-worker function with the model's forward replaced by a sleep (in each worker)."""
    from distributed import trainer
    from models import registry

    real = registry._MODELS[MODEL]

    def factory(**kwargs):
        model = real(**kwargs)
        model.forward = types.MethodType(_fake_forward, model)
        return model

    registry._MODELS[MODEL] = factory
    trainer.train_loop_per_worker(config)


def _records(run_dir: str) -> list[dict]:
    try:
        from distributed.metrics import read_metrics
    except ImportError:  # the code before metrics parts (main at e127f63): one metrics.jsonl
        from distributed.run_folder import RunFolder

        return RunFolder(run_dir).read_jsonl("metrics.jsonl")
    return read_metrics(run_dir)


def checkpoint_mb(run_dir: str) -> float:
    """Size of the newest checkpoint directory."""
    newest = max(n for n in os.listdir(run_dir) if n.startswith("checkpoint_") and "snapshot" not in n)
    root = os.path.join(run_dir, newest)
    return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files) / 2**20, 1)


def measure(run_dir: str) -> dict:
    """Training time and what the checkpoints cost the training thread, from the per-step metrics records.

    excess_s: for each step followed by a checkpoint, its step-to-step time minus the median of the other
    steps' (the whole stall, whatever each code version counts in save_s); overhead = excess / (train - excess).
    """
    records = _records(run_dir)
    trains = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    saved = {r["step"]: r["save_s"] for r in records if r["kind"] == "checkpoint"}
    pairs = [(a, b) for a, b in zip(trains, trains[1:]) if b["step"] == a["step"] + 1]
    plain = statistics.median(b["time"] - a["time"] for a, b in pairs if a["step"] not in saved)
    stalls = [b["time"] - a["time"] - plain for a, b in pairs if a["step"] in saved]
    train_s = trains[-1]["time"] - trains[0]["time"]
    excess = sum(stalls)
    return {"steps": trains[-1]["step"] - trains[0]["step"], "train_s": round(train_s, 2),
            "step_s_median": round(plain, 3), "checkpoints": len(stalls), "excess_s": round(excess, 2),
            "excess_per_checkpoint_s": round(excess / len(stalls), 3) if stalls else None,
            "save_s_median": round(statistics.median(saved[a["step"]] for a, _ in pairs if a["step"] in saved), 3)
            if stalls else None,
            "overhead": round(excess / max(train_s - excess, 1e-9), 4), "checkpoint_mb": checkpoint_mb(run_dir)}


def run(shards: str, storage: str, name: str, every: int, fake_step_s: float | None) -> dict:
    from distributed import trainer
    from distributed.config import load_config

    cfg = load_config(CONFIG, [f"data.url={shards}", f"run.storage_path={storage}", f"run.name={name}",
                               "schedule.epochs=1", "schedule.warmup_epochs=0.2", "run.log_every_steps=1",
                               f"run.checkpoint_every_steps={every}", "run.num_to_keep=100", "run.max_failures=0"])
    real = trainer.train_loop_per_worker
    if fake_step_s is not None:
        trainer.train_loop_per_worker = fake_gpu_worker
    try:
        trainer.fit(cfg)
    finally:
        trainer.train_loop_per_worker = real
    return measure(os.path.join(storage, name))


def scenario(shards: str, storage: str, name: str, every: int, fake_step_s: float | None) -> dict:
    with_ckpt = run(shards, storage, f"{name}-every{every}", every, fake_step_s)
    without = run(shards, storage, f"{name}-none", 10**6, fake_step_s)
    return {"with_checkpoints": with_ckpt, "without": without,
            "wall_overhead": round(with_ckpt["train_s"] / without["train_s"] - 1, 4)}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=160, help="train images per class (5 classes, 32 per step)")
    p.add_argument("--every", type=int, default=4, help="checkpoint every this many steps")
    p.add_argument("--fake-step-s", type=float, default=0.1, help="simulated GPU step time")
    p.add_argument("--json", action="store_true", help="print only the JSON result (and Ray's own log lines)")
    args = p.parse_args(argv)
    import ray
    import torch

    from data import make_sample, prepare_dataset
    from distributed.cluster import init_ray

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="ckpt-overhead-") as tmp:
        make_sample(f"{tmp}/raw", classes=5, per_class=args.per_class, val_per_class=8, test=0, seed=0)
        prepare_dataset(f"{tmp}/raw", f"{tmp}/shards", shard_size=200, splits=["train", "val"], log=lambda s: None)
        os.environ[FAKE_STEP_S_ENV] = str(args.fake_step_s)  # before Ray starts: its workers inherit it
        init_ray(None)
        results = {"demo": scenario(f"{tmp}/shards", f"{tmp}/runs", "demo", args.every, None),
                   "fake_gpu": scenario(f"{tmp}/shards", f"{tmp}/runs", "fake", args.every, args.fake_step_s)}
        ray.shutdown()  # so no log line of Ray's comes after the JSON
    out = {"benchmark": "checkpoint_overhead", "commit": _commit(), "config": CONFIG, "model": MODEL,
           "per_class": args.per_class, "checkpoint_every_steps": args.every, "fake_step_s": args.fake_step_s,
           **results, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "ray": ray.__version__, "wall_s": round(time.time() - start, 1)}
    if not args.json:
        for name in ("demo", "fake_gpu"):
            r = results[name]["with_checkpoints"]
            print(f"{name}: step {r['step_s_median']} s, {r['checkpoints']} checkpoints stalled {r['excess_s']} s "
                  f"of {r['train_s']} s ({100 * r['overhead']:.1f} %), wall overhead "
                  f"{100 * results[name]['wall_overhead']:.1f} %", flush=True)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
