"""Recovery cost at the demo scale: seconds from a worker kill to the first training step after resume, and the
checkpoint save time as a fraction of a training step.

    python -m benchmarks.recovery [--json] [--per-class 80] [--kill-after 4]

configs/demo.yaml (2 Ray workers on a local Ray on 127.0.0.1, its model, image size and batch) for one epoch of
a small generated sample (5 classes x `--per-class` train images), a checkpoint every `--kill-after` steps and a
metrics record per step. Once the checkpoint of step `--kill-after` is on storage, one RayTrainWorker process
gets SIGKILL; Ray Train restarts the workers, they restore that checkpoint and go on. From the metrics
(wall-clock "time" per step, "checkpoint" records with save_s) and attempts.jsonl:

- recovery_s: kill -> end of the first training step after the resume (one step_s of it is that step);
  kill_to_restored_s: kill -> the new workers have restored the checkpoint (Ray's failure detection, the
  worker group restart, process start-up, imports, model build and the checkpoint download and load);
- checkpoint_save_s: median of the reports' save times (local save, manifest, copy to storage, report barrier);
  step_s: median time of a plain training step; checkpoint_fraction = checkpoint_save_s / step_s, and
  per_step_overhead = checkpoint_fraction / checkpoint_every_steps.

About 2 minutes on 2 CPU cores. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import tempfile
import threading
import time

import psutil

CONFIG = "configs/demo.yaml"


def session_train_workers() -> list[psutil.Process]:
    """RayTrainWorker processes of this process's Ray (children of its raylet)."""
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    found = []
    for p in raylet.children():
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_a_worker_after(checkpoint_dir: str, killed: dict, timeout: float = 600) -> None:
    """SIGKILL one training worker as soon as `checkpoint_dir` is complete on storage (its manifest is there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = session_train_workers()
        if os.path.exists(os.path.join(checkpoint_dir, "manifest.rank0.json")) and len(workers) >= 2:
            victim = workers[-1]
            killed["time"] = time.time()
            victim.send_signal(signal.SIGKILL)
            killed["pid"] = victim.pid
            return
        time.sleep(0.02)


def measure(run_dir: str, killed: dict, every: int) -> dict:
    from distributed.metrics import read_metrics
    from distributed.run_folder import RunFolder

    run = RunFolder(run_dir)
    records = read_metrics(run)
    attempts = run.read_jsonl("attempts.jsonl")
    trains = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    saves = [r["save_s"] for r in records if r["kind"] == "checkpoint"]
    after = [r for r in trains if r["time"] > killed["time"]]
    resumed = attempts[-1]
    # Plain steps: consecutive records of one attempt with no checkpoint or evaluation between them.
    steps = [b["time"] - a["time"] for a, b in zip(trains, trains[1:])
             if b["step"] == a["step"] + 1 and a["step"] % every and b["epoch"] == a["epoch"]
             and not a["time"] < killed["time"] < b["time"] and b["step"] != resumed["restored_step"] + 1]
    step_s = statistics.median(steps)
    save_s = statistics.median(saves)
    return {"restored_step": resumed["restored_step"], "restored_from": resumed["restored_from"],
            "recovery_s": round(after[0]["time"] - killed["time"], 2),
            "kill_to_restored_s": round(resumed["time"] - killed["time"], 2),
            "first_step_after_resume": after[0]["step"],
            "step_s": round(step_s, 3), "checkpoint_save_s": round(save_s, 3),
            "checkpoint_saves": len(saves), "checkpoint_fraction": round(save_s / step_s, 3),
            "per_step_overhead": round(save_s / step_s / every, 4),
            "failures_survived": len(attempts) - 1}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=80, help="train images per class (5 classes)")
    p.add_argument("--kill-after", type=int, default=4, help="checkpoint interval; kill once this step's is saved")
    p.add_argument("--json", action="store_true", help="print only the JSON result (and Ray's own log lines)")
    args = p.parse_args(argv)
    import ray
    import torch

    from data import make_sample, prepare_dataset
    from distributed.checkpoint import checkpoint_dir_name
    from distributed.cluster import init_ray
    from distributed.config import load_config
    from distributed.trainer import fit

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        make_sample(f"{tmp}/raw", classes=5, per_class=args.per_class, val_per_class=8, test=0, seed=0)
        prepare_dataset(f"{tmp}/raw", f"{tmp}/shards", shard_size=100, splits=["train", "val"], log=lambda s: None)
        overrides = [f"data.url={tmp}/shards", f"run.storage_path={tmp}/runs", "run.name=recovery",
                     "schedule.epochs=1", "schedule.warmup_epochs=0.2", f"run.checkpoint_every_steps={args.kill_after}",
                     "run.log_every_steps=1", "run.max_failures=1"]
        cfg = load_config(CONFIG, overrides)
        init_ray(cfg.run.address)
        killed: dict = {}
        killer = threading.Thread(target=kill_a_worker_after, daemon=True, args=(
            f"{tmp}/runs/recovery/{checkpoint_dir_name(args.kill_after)}", killed))
        killer.start()
        summary = fit(cfg)
        killer.join(timeout=5)
        if "time" not in killed:
            raise RuntimeError("the run ended before a worker could be killed; lower --kill-after")
        result = measure(f"{tmp}/runs/recovery", killed, args.kill_after)
        ray.shutdown()  # so no log line of Ray's comes after the JSON
    out = {"benchmark": "recovery", "config": CONFIG, "overrides": overrides[3:], "model": cfg.model.name,
           "strategy": cfg.strategy.name, "world_size": cfg.run.num_workers, "image_size": cfg.data.image_size,
           "batch_size": cfg.data.batch_size, "steps": summary["steps"], "checkpoint_every_steps": args.kill_after,
           **result, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "ray": ray.__version__, "wall_s": round(time.time() - start, 1)}
    if not args.json:
        print(f"worker SIGKILLed after the step-{args.kill_after} checkpoint: first step after resume "
              f"{out['recovery_s']} s later (restored {out['kill_to_restored_s']} s after the kill); checkpoint save "
              f"{out['checkpoint_save_s']} s = {out['checkpoint_fraction']} steps of {out['step_s']} s", flush=True)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
