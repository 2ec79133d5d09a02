"""Recovery cost per fault kind, on a real multi-node Ray cluster on 127.0.0.1 (tests/multinode.py): seconds from
the fault to the first training step after it, steps lost, and the checkpoint overhead.

    python -m benchmarks.recovery [--json] [--fault KIND[,KIND...]|all] [--per-class 80] [--epochs 3]
                                  [--checkpoint-every 4] [--fault-at-step 6] [--drain-deadline 30]

    KIND: worker_kill, worker_sigterm, node_loss, node_drain, driver_kill, elastic_grow

The cluster: a head (the driver) and two worker nodes of 2 CPUs each, shards and checkpoints on a moto S3
server on 127.0.0.1. The job: `python -m jobs.train --config configs/demo.yaml` (se_googlenet, DDP, 2 workers of
1 CPU, 64 px, global batch 32: 16 per worker) on a generated 5-class sample (5 x `--per-class` train images: 12 steps per
epoch at 80), a checkpoint every `--checkpoint-every` steps, a metrics record per step. Once rank 0 has printed
step `--fault-at-step` (halfway between two checkpoints by default) and the checkpoint before it is on storage,
the fault:

- worker_kill: one training worker process SIGKILLed;
- node_loss: the node running the workers vanishes (its raylet and all its processes SIGKILLed);
- worker_sigterm: one training worker process gets SIGTERM (the loop checkpoints and releases its node);
- node_drain: that node drained (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`) with a deadline of
  `--drain-deadline` s (the loop checkpoints on notice and releases the node); the provider removes it at the
  deadline if it is still there;
- driver_kill: the driver SIGKILLed (the nodes live), and the same command started again as soon as it is gone;
- elastic_grow: the run starts with `run.num_workers=1,2` (2 CPUs per rank) on node_a alone; the fault is node_b
  joining. Ray Train's elastic policy restarts the worker group at 2 ranks at its next resize check (every
  `run.elastic_resize_interval_s`, set to 10 s here; Ray's default 60 s) from the newest checkpoint.

Per kind, from the run folder (metrics.jsonl: wall-clock "time" per step, "checkpoint" records with save_s;
attempts.jsonl) and the driver's output (rank 0 prints every step and where each attempt starts):
- recovery_s: fault -> end of the first training step of the attempt that restored a checkpoint after it;
  fault_to_restored_s: fault -> that attempt has restored its checkpoint;
- steps_lost: steps trained before the restart minus the restored step (redone after it);
- counted_as: how Ray Train's FailurePolicy charged the restart ("worker group" = run.max_failures,
  "preemption" = FailureConfig.max_preemption_failures; none for a resubmitted driver);
- node_drain also: drain_to_checkpoint_s (drain accepted -> the next checkpoint complete on storage);
- world_sizes: the ranks of each attempt;
- checkpoint_save_s: median of the reports' save times (local save, manifest, upload, report barrier);
  step_s: median plain training step; checkpoint_fraction = checkpoint_save_s / step_s; per_step_overhead =
  checkpoint_fraction / checkpoint_every.

One cluster start for all kinds; each kind is a fresh run on the initial shape. On the 2-core sandbox at load
averages of 3-15 (other jobs running): 4 minutes for one kind with `--epochs 2`, 28 minutes for `--fault all`.
The last line is one JSON object, with the load average it ran under; a kind that fails is reported with its
error, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import threading
import time

from tests.multinode import ATTEMPT_START as START
from tests.multinode import STEP_LINE as STEP

FAULTS = ["worker_kill", "worker_sigterm", "node_loss", "node_drain", "driver_kill", "elastic_grow"]
# Per kind, overrides on top of the common ones, and the worker nodes the run starts with.
# One rank per 2-CPU node (1 node -> 1 rank, 2 -> 2); Ray Train checks for a resize every 10 s (its default, 60 s,
# would outlast the demo run).
ELASTIC = ["run.num_workers=1,2", "run.cpus_per_worker=2", "run.elastic_resize_interval_s=10"]
CONFIG = "configs/demo.yaml"
WORKERS = {"node_a": 2, "node_b": 2}
POLICY = re.compile(r"\[FailurePolicy\] (\w+)\s.*?Source: ([\w ]+?)\s*$", re.S | re.M)


class Run:
    """One training run of the benchmark on the cluster: its driver(s), run folder and checkpoints."""

    def __init__(self, cluster, bucket: str, kind: str, args, logs: str):
        self.cluster, self.kind, self.logs = cluster, kind, logs
        self.folder = f"{bucket}/runs/{kind}"
        self.overrides = [f"data.url=s3://{bucket}/shards", f"run.storage_path=s3://{bucket}/runs", f"run.name={kind}",
                          f"schedule.epochs={args.epochs}", "schedule.warmup_epochs=0.2",
                          f"run.checkpoint_every_steps={args.checkpoint_every}", "run.log_every_steps=1",
                          "run.max_failures=1", *(ELASTIC if kind == "elastic_grow" else [])]
        self.argv = ["-m", "jobs.train", "--config", CONFIG, *[a for o in self.overrides for a in ("--set", o)]]
        self.drivers = []

    def start(self):
        log = os.path.join(self.logs, f"{self.kind}-{len(self.drivers)}.log")
        # Ray Train's default drain poll (5 s) kept: the figures are what a default job sees.
        self.drivers.append((self.cluster.start_driver(self.argv, log), log))
        return self

    @property
    def driver(self):
        return self.drivers[-1][0]

    def output(self) -> str:
        return "".join(open(log).read() for _, log in self.drivers)

    def complete_checkpoints(self) -> list[str]:
        import s3fs

        from tests.multinode import uploaded_checkpoints

        return uploaded_checkpoints(s3fs.S3FileSystem(skip_instance_cache=True), self.folder)

    def wait(self, ready, what: str, timeout: float = 900):
        deadline = time.monotonic() + timeout
        while not (value := ready()):
            if self.driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: no {what} (driver exit {self.driver.poll()}):\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.05)
        return value


def inject(run: Run, args) -> dict:
    """Wait for step `fault_at_step` and the checkpoint before it on storage, then cause `run.kind`'s fault."""
    from distributed.checkpoint import checkpoint_dir_name

    cluster = run.cluster
    target = checkpoint_dir_name((args.fault_at_step - 1) // args.checkpoint_every * args.checkpoint_every)
    run.wait(lambda: max(map(int, STEP.findall(run.output())), default=0) >= args.fault_at_step
             and target in run.complete_checkpoints() and cluster.nodes_with_train_workers(),
             f"step {args.fault_at_step}")
    node = cluster.nodes_with_train_workers()[0]
    if run.kind == "worker_kill":
        victim = cluster.train_workers(node)[-1]
        fault = time.time()
        victim.send_signal(signal.SIGKILL)
        return {"time": fault}
    if run.kind == "worker_sigterm":
        victim = cluster.train_workers(node)[-1]
        fault = time.time()
        victim.send_signal(signal.SIGTERM)
        return {"time": fault}
    if run.kind == "node_loss":
        return {"time": cluster.remove_node(node)}
    if run.kind == "elastic_grow":
        fault = time.time()
        cluster.add_node("node_b", WORKERS["node_b"])
        return {"time": fault}
    if run.kind == "node_drain":
        return drain(run, node, args.drain_deadline)
    fault = time.time()
    os.killpg(run.driver.pid, signal.SIGKILL)
    run.driver.wait(timeout=30)
    run.start()  # the resubmission, as soon as the old driver is gone
    return {"time": fault, "resubmitted_after_s": round(time.time() - fault, 2)}


def drain(run: Run, node: str, deadline_s: int) -> dict:
    before = set(run.complete_checkpoints())
    accepted = run.cluster.drain(node, deadline_s)

    def provider():  # the cloud ends the instance at the deadline (Ray does not end a busy drained node)
        time.sleep(max(0.0, accepted + deadline_s - time.time()))
        if node in run.cluster.nodes:
            run.cluster.remove_node(node)

    thread = threading.Thread(target=provider, daemon=True)
    thread.start()
    saved = None
    while run.driver.poll() is None and time.time() < accepted + deadline_s:
        if set(run.complete_checkpoints()) - before:
            saved = time.time()
            break
        time.sleep(0.05)
    return {"time": accepted, "provider": thread, "deadline_s": deadline_s,
            "drain_to_checkpoint_s": round(saved - accepted, 2) if saved else None}


def measure(run: Run, fault: dict, every: int) -> dict:
    from distributed.metrics import read_metrics
    from distributed.run_folder import RunFolder

    folder = RunFolder(f"s3://{run.folder}")
    records, attempts = read_metrics(folder), folder.read_jsonl("attempts.jsonl")
    trains = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["time"])
    saves = [r["save_s"] for r in records if r["kind"] == "checkpoint"]
    resumed = next((a for a in attempts if a["time"] > fault["time"]), None)
    out = run.output()
    starts = [m.start() for m in START.finditer(out)]
    before = [int(s) for s in STEP.findall(out[:starts[1]])] if len(starts) > 1 else []
    steps = [b["time"] - a["time"] for a, b in zip(trains, trains[1:])
             if b["step"] == a["step"] + 1 and a["step"] % every and b["epoch"] == a["epoch"]
             and not a["time"] < fault["time"] < b["time"]
             and (not resumed or b["step"] != resumed["restored_step"] + 1)]
    step_s, save_s = statistics.median(steps), statistics.median(saves)
    policies = [(d, src) for d, src in POLICY.findall(out)]
    result = {"restarts": len(attempts) - 1, "counted_as": policies[0][1] if policies else None,
              "world_sizes": [a.get("world_size") for a in attempts],
              "step_s": round(step_s, 3), "checkpoint_save_s": round(save_s, 3), "checkpoint_saves": len(saves),
              "checkpoint_fraction": round(save_s / step_s, 3), "per_step_overhead": round(save_s / step_s / every, 4),
              **{k: v for k, v in fault.items() if k != "time"}}
    if resumed is None:  # e.g. a drain whose run ended before its deadline
        return {**result, "recovery_s": None, "steps_lost": 0}
    first = next(r for r in trains if r["time"] > resumed["time"])
    return {**result, "restored_step": resumed["restored_step"], "restored_from": resumed["restored_from"],
            "recovery_s": round(first["time"] - fault["time"], 2),
            "fault_to_restored_s": round(resumed["time"] - fault["time"], 2),
            "steps_lost": max(before, default=resumed["restored_step"]) - resumed["restored_step"]}


def run_kind(cluster, bucket: str, kind: str, args, logs: str) -> dict:
    cluster.reset()
    if kind == "elastic_grow":  # starts on node_a alone
        cluster.remove_node("node_b")
    run = Run(cluster, bucket, kind, args, logs).start()
    fault = inject(run, args)
    run.driver.wait(timeout=1800)
    if "provider" in fault:  # before the next kind re-adds a node of the same name
        fault.pop("provider").join()
    if run.driver.returncode != 0:
        raise RuntimeError(f"{kind}: the run failed:\n{run.output()[-4000:]}")
    summary = json.loads([line for line in run.output().splitlines() if line.startswith("{")][-1])
    return {"steps": summary["steps"], **measure(run, fault, args.checkpoint_every)}


def prepare(tmp: str, per_class: int) -> str:
    """The sample's shards in a new bucket on the S3 server; returns the bucket."""
    import s3fs

    from data import make_sample, prepare_dataset

    make_sample(f"{tmp}/raw", classes=5, per_class=per_class, val_per_class=8, test=0, seed=0)
    prepare_dataset(f"{tmp}/raw", f"{tmp}/shards", shard_size=100, splits=["train", "val"], log=lambda s: None)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("recovery")
    fs.put(f"{tmp}/shards", "recovery/shards", recursive=True)
    return "recovery"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fault", default="worker_kill", help=f"comma-separated kinds of {FAULTS}, or all")
    p.add_argument("--per-class", type=int, default=80, help="train images per class (5 classes)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--checkpoint-every", type=int, default=4, help="run.checkpoint_every_steps")
    p.add_argument("--fault-at-step", type=int, default=6, help="the fault once rank 0 has printed this step")
    p.add_argument("--drain-deadline", type=int, default=30,
                   help="seconds from the drain to the node's end (30: a GCE preemption notice; AWS gives 120)")
    p.add_argument("--json", action="store_true", help="print only the JSON result (and Ray's own log lines)")
    args = p.parse_args(argv)
    import ray
    import torch

    from tests.conftest import s3_environment
    from tests.multinode import MultiNodeCluster

    start, load = time.time(), os.getloadavg()
    kinds = FAULTS if args.fault == "all" else args.fault.split(",")
    if set(kinds) - set(FAULTS):
        p.error(f"--fault: unknown kind(s) {sorted(set(kinds) - set(FAULTS))}; valid: {', '.join(FAULTS)}, all")
    results = {}
    with s3_environment(), tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        bucket = prepare(tmp, args.per_class)
        cluster = MultiNodeCluster(WORKERS).start()
        try:
            for kind in kinds:
                try:
                    results[kind] = run_kind(cluster, bucket, kind, args, tmp)
                except Exception as e:  # noqa: BLE001 -- report it with the other kinds' figures
                    results[kind] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
                print(f"{kind}: {json.dumps(results[kind])}", flush=True, file=sys.stderr if args.json else sys.stdout)
        finally:
            left = cluster.shutdown()
    out = {"benchmark": "recovery", "config": CONFIG, "cluster": {"head_cpus": 0, "workers": WORKERS},
           "model": "se_googlenet", "world_size": 2, "epochs": args.epochs,
           "checkpoint_every_steps": args.checkpoint_every, "fault_at_step": args.fault_at_step,
           "results": results, "left_behind": left, "load_avg_at_start": [round(x, 2) for x in load],
           "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
           "wall_s": round(time.time() - start, 1)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()["results"].values()) else 0)
