"""Node-level faults on a real multi-node Ray cluster on 127.0.0.1 (tests/multinode.py).

A head (drivers, Ray Train's controller) and two worker nodes of 2 CPUs each; data and checkpoints on the S3
server on 127.0.0.1. Each test runs `python -m jobs.train` as a driver on the head, with the tiny config of
tests/conftest.py, and injects one fault once the epoch-1 checkpoint (step 4) is on storage:

- the node running the training workers vanishes (raylet and all its processes SIGKILLed);
- that node is drained with a deadline (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`): the run
  checkpoints on notice and restarts on the other node as a preemption, losing no step;
- one of its training workers gets SIGTERM: the same, the node drained by the run itself;
- the driver is SIGKILLed while the worker nodes live, and the job is submitted again;
- elastic runs (one rank per node): a node vanishes and the run goes on at one rank; a node joins (after the
  step-2 checkpoint, the one rank frozen until Ray Train decides to grow) and the run grows to two. These check
  issue 10's exactly-once accounting too.

docs/fault_tolerance.md ("Node-level faults") says what Ray Train 2.60 does in each case and why.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import pytest
import s3fs

from distributed import checkpoint as ckpt
from distributed.checkpoint import checkpoint_step
from distributed.run_folder import RunFolder
from tests.conftest import tiny_overrides
from tests.multinode import (STEP_LINE, epoch_sample_set, steps_lost, trained_keys,
                             uploaded_checkpoints)
from tests.test_chaos import verifies, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

RUN_BUDGET_S = 480  # a hang guard for one driver run (about a minute on an idle 2-core machine), not a speed test
STEPS_PER_EPOCH = 4  # tiny config: 71 training samples // global batch 16
# Ray Train polls Ray Core's drain state every 5 s by default; 1 s keeps the tiny run from ending before it looks.
DRIVER_ENV = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
NOTICE = re.compile(r"rank 0: Ray is draining a node of this run; checkpoint at step (\d+)")  # distributed/loop.py
GROW_DECISION = "Deciding to resize the worker group from 1 -> 2 workers"  # Ray Train's ElasticScalingPolicy
SIGTERM_NOTICE = re.compile(r"rank 0: a rank got SIGTERM; checkpoint at step (\d+)")


@pytest.fixture(scope="module")
def bucket(multinode_cluster, shards):
    """A bucket holding the tiny shards; each test's run folder goes under runs/ there."""
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    name = f"multinode-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    fs.put(shards, f"{name}/shards", recursive=True)
    return name


class Job:
    """One run of `python -m jobs.train` on the cluster, and what it left in its run folder on S3."""

    def __init__(self, cluster, bucket: str, name: str, tmp_path, *overrides: str, env: dict | None = None):
        self.cluster, self.tmp_path, self.name = cluster, tmp_path, name
        self.env = {**DRIVER_ENV, **(env or {})}
        self.folder = f"{bucket}/runs/{name}"
        cfg = tiny_overrides(f"s3://{bucket}/shards", f"s3://{bucket}/runs", name, *overrides)
        self.overrides = cfg
        self.argv = ["-m", "jobs.train", "--config", "configs/demo.yaml", *[a for o in cfg for a in ("--set", o)]]
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True)
        self.launches = 0
        self.proc = None

    def start(self):
        self.launches += 1
        self.log = self.tmp_path / f"{self.name}-{self.launches}.log"
        self.proc = self.cluster.start_driver(self.argv, self.log, **self.env)
        return self

    def output(self) -> str:
        return self.log.read_text()

    def checkpoints(self) -> list[str]:
        """Checkpoints whose files are all on storage, oldest first."""
        return uploaded_checkpoints(self.fs, self.folder)

    def wait_for(self, ready, what: str, timeout: float = RUN_BUDGET_S):
        """Poll `ready()` until it returns something truthy; fail if the driver exits first."""
        deadline = time.monotonic() + timeout
        while not (value := ready()):
            assert self.proc.poll() is None, f"the driver exited {self.proc.returncode} before {what}:\n" \
                                             f"{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.output()[-4000:]}"
            time.sleep(0.25)  # each look is a few S3 requests: moto and s3fs share the 2 cores with the run
        return value

    def training_node(self) -> str:
        """Once the epoch-1 checkpoint is on storage: the worker node both ranks run on (Ray Train packs them)."""
        self.wait_for(lambda: ckpt.checkpoint_dir_name(STEPS_PER_EPOCH) in self.checkpoints(), "epoch-1 checkpoint")
        nodes = self.wait_for(self.cluster.nodes_with_train_workers, "training workers")
        assert len(nodes) == 1 and len(self.cluster.train_workers(nodes[0])) == 2, nodes
        return nodes[0]

    def finish(self) -> dict:
        """Wait for the driver; it must succeed. Returns the summary it printed last."""
        self.proc.wait(timeout=RUN_BUDGET_S)
        assert self.proc.returncode == 0, self.output()[-6000:]
        return json.loads([line for line in self.output().splitlines() if line.startswith("{")][-1])

    def attempts(self) -> list[dict]:
        return RunFolder(f"s3://{self.folder}").read_jsonl("attempts.jsonl")

    def config(self):
        from distributed.config import load_config

        return load_config("configs/demo.yaml", self.overrides)

    def steps_trained(self) -> int:
        return max(map(int, STEP_LINE.findall(self.output())), default=0)

    def check_interrupted_epoch(self, sample_log) -> None:
        """Steps lost <= the steps since the checkpoint restored, and the epoch of the fault trained every one of
        its samples exactly once (issue 10's guarantee)."""
        lost, restored = steps_lost(self.output())
        assert 0 <= lost <= self.config().run.checkpoint_every_steps, (lost, restored)
        epoch = restored // STEPS_PER_EPOCH  # of the steps redone after the restart (checkpoints close each epoch)
        assert trained_keys(sample_log, epoch) == epoch_sample_set(self.config(), epoch)


def test_node_lost_mid_run_restarts_on_the_other_node(multinode, bucket, tmp_path):
    """No warning: a failure, counted against run.max_failures; the run goes on from its newest checkpoint."""
    job = Job(multinode, bucket, "node-lost", tmp_path, "schedule.epochs=3", "run.checkpoint_every_steps=100",
              "run.max_failures=1").start()
    lost = job.training_node()
    newest = job.checkpoints()[-1]
    multinode.remove_node(lost)
    summary = job.finish()
    assert summary["failures_survived"] == 1 and summary["steps"] == 3 * STEPS_PER_EPOCH, summary
    attempts = job.attempts()
    assert [a["restored_from"] for a in attempts] == ["scratch", f"run:{newest}"], attempts
    assert "Source: worker group" in job.output()  # Ray Train's FailurePolicy: a failure, not a preemption


def test_drained_node_checkpoints_on_notice_and_restarts_as_a_preemption_losing_no_step(multinode, bucket, tmp_path):
    """A spot reclaim notice (drained with a 2-minute deadline). run.max_failures=0, yet the run finishes: the loop
    checkpoints on notice, trains no more and releases the node (distributed/preemption.py); Ray Train restarts the
    workers on the other node right away, charged to FailureConfig.max_preemption_failures. Nothing is lost."""
    job = Job(multinode, bucket, "drained", tmp_path, "schedule.epochs=3", "run.checkpoint_every_steps=100",
              "run.log_every_steps=1", "run.max_failures=0").start()
    drained = job.training_node()
    multinode.drain(drained, deadline_s=120)
    summary = job.finish()
    step = int(NOTICE.search(job.output()).group(1))
    assert STEPS_PER_EPOCH < step < 3 * STEPS_PER_EPOCH
    assert steps_lost(job.output()) == (0, step)
    assert [a["restored_from"] for a in job.attempts()] == ["scratch", f"run:{ckpt.checkpoint_dir_name(step)}"]
    assert "Source: preemption" in job.output()  # Ray Train's FailurePolicy: charged to max_preemption_failures
    assert summary["steps"] == 3 * STEPS_PER_EPOCH and summary["epochs"] == 3, summary


def test_sigterm_to_a_worker_restarts_as_a_preemption_losing_no_step(multinode, bucket, tmp_path):
    """SIGTERM to one training worker, taken as its node going away: every rank checkpoints, the node is drained
    and released; run.max_failures=0, and Ray Train charges the restart to max_preemption_failures."""
    job = Job(multinode, bucket, "sigterm", tmp_path, "schedule.epochs=3", "run.checkpoint_every_steps=100",
              "run.log_every_steps=1", "run.max_failures=0").start()
    node = job.training_node()
    multinode.train_workers(node)[-1].send_signal(signal.SIGTERM)
    summary = job.finish()
    step = int(SIGTERM_NOTICE.search(job.output()).group(1))
    assert steps_lost(job.output()) == (0, step) and step > STEPS_PER_EPOCH
    assert [a["restored_from"] for a in job.attempts()] == ["scratch", f"run:{ckpt.checkpoint_dir_name(step)}"]
    assert "Source: preemption" in job.output()
    assert summary["steps"] == 3 * STEPS_PER_EPOCH, summary


def test_driver_killed_while_worker_nodes_live_then_resubmitted_resumes(multinode, bucket, tmp_path):
    """The head's driver dies (its process only): Ray ends the run's workers, the nodes stay; the same command
    submitted again resumes from the newest checkpoint on storage."""
    job = Job(multinode, bucket, "driver-killed", tmp_path, "schedule.epochs=3", "run.checkpoint_every_steps=2",
              "run.max_failures=0").start()
    node = job.training_node()
    workers = [p.pid for p in multinode.train_workers(node)]
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.proc.wait(timeout=10)
    assert not wait_gone(workers, timeout=60), "training workers outlived their driver"
    assert all(multinode.node_alive(n) for n in multinode.nodes)
    newest = [n for n in job.checkpoints() if verifies(job.fs, f"{job.folder}/{n}", tmp_path)][-1]
    summary = job.start().finish()
    assert summary["started_from"] == f"run:{newest}" and checkpoint_step(newest) >= STEPS_PER_EPOCH, summary
    assert summary["steps"] == 3 * STEPS_PER_EPOCH and summary["failures_survived"] == 0, summary
    launches = list(dict.fromkeys(a["launch_id"] for a in job.attempts()))
    assert len(launches) == 2


# -- elastic runs (run.num_workers as a range): one rank per 2-CPU node, so the node count is the rank count ------

ELASTIC = ["run.num_workers=1,2", "run.cpus_per_worker=2", "run.log_every_steps=1", "run.checkpoint_every_steps=2"]


def test_node_lost_without_replacement_the_run_goes_on_at_one_rank(multinode, bucket, tmp_path):
    """A node vanishes and none replaces it: Ray Train restarts the worker group at the size that fits (one rank),
    charged to run.max_failures; the epoch goes on where its checkpoint left it, every sample once.

    Ray Train sizes the restart from its AutoscalingCoordinator's view of the cluster, refreshed every 20 s: within
    that window it still counts the lost node, asks for two ranks, and waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (60 s by default) for a placement that cannot come before it retries at one (a controller error, not counted
    against max_failures; docs/fault_tolerance.md). 5 s here (a placement that can come is ready in well under a
    second, "Placement group ready in 0.00s" in the controller's log) and a look asked for once the node is dead
    keep the test short."""
    multinode.reset_train_view()  # start at 2 ranks, whatever the tests before did
    job = Job(multinode, bucket, "shrink", tmp_path, *ELASTIC, "schedule.epochs=3", "run.max_failures=1",
              f"run.sample_log={tmp_path / 'samples'}", env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}).start()
    job.wait_for(lambda: ckpt.checkpoint_dir_name(STEPS_PER_EPOCH) in job.checkpoints(), "epoch-1 checkpoint")
    nodes = job.wait_for(lambda: len(multinode.nodes_with_train_workers()) == 2 and multinode.nodes_with_train_workers(),
                         "a rank on each node")
    lost = multinode.nodes[nodes[-1]].node_id
    multinode.remove_node(nodes[-1])
    job.wait_for(lambda: not multinode.node_alive(lost), "the GCS to mark the node dead", timeout=60)
    multinode.refresh_train_view()  # Ray's own look would come within 20 s, after a stale start or two
    summary = job.finish()
    assert [a["world_size"] for a in job.attempts()] == [2, 1]
    assert summary["steps"] == 3 * STEPS_PER_EPOCH and summary["failures_survived"] == 1, summary
    job.check_interrupted_epoch(tmp_path / "samples")


def test_elastic_run_grows_when_a_node_joins(multinode, bucket, tmp_path):
    """The run starts on one node with num_workers=1,2; a second node joins and Ray Train's elastic policy
    restarts the worker group at two ranks at its next resize check, from the newest checkpoint.

    Ray Train sees a new node through its AutoscalingCoordinator, which looks at the cluster every 20 s (asked for a
    look at once here), and checks for a resize every run.elastic_resize_interval_s. The tiny run could end before
    that, so its one rank is frozen (SIGSTOP) from the node's arrival until the controller has decided to grow: a
    real epoch lasts far longer than the check. Ray Train tolerates a worker whose poll hangs (10 min)."""
    multinode.remove_node("node_b")
    multinode.reset_train_view()  # start at 1 rank, not at a stale count
    job = Job(multinode, bucket, "grow", tmp_path, *ELASTIC, "schedule.epochs=2", "run.max_failures=0",
              "run.elastic_resize_interval_s=5", f"run.sample_log={tmp_path / 'samples'}").start()
    job.wait_for(lambda: ckpt.checkpoint_dir_name(2) in job.checkpoints(), "step-2 checkpoint")
    [rank0] = multinode.train_workers("node_a")
    rank0.suspend()
    try:
        multinode.add_node("node_b", 2)
        multinode.refresh_train_view()  # Ray's own look would come within 20 s; the resize check then within 5 s
        job.wait_for(lambda: GROW_DECISION in job.output(), "Ray Train's decision to grow", timeout=120)
    finally:
        rank0.resume()
    summary = job.finish()
    assert [a["world_size"] for a in job.attempts()] == [1, 2]
    assert summary["steps"] == 2 * STEPS_PER_EPOCH, summary
    job.check_interrupted_epoch(tmp_path / "samples")
