"""Autoscaling rehearsal: cluster.yaml's node types on Ray's fake multi-node provider (tests/autoscaling.py).

A Ray Train job asking for 2 workers of 4 (fake) A10G GPUs each starts two nodes of an A10G type on a head that
has none; once the job is over, the autoscaler removes them after `idle_timeout_minutes` (6 s here, 10 min in
cluster.yaml).
"""
from __future__ import annotations

import json
import time

import pytest

from tests.autoscaling import FAKE_GPU, FakeAutoscalingCluster

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

WORKERS = 2
# What ScalingConfig(resources_per_worker={"GPU": 4}, accelerator_type="A10G") asks for, in the rehearsal's names.
PER_WORKER = {"CPU": 1, FAKE_GPU: 4, "accelerator_type:A10G": 0.001}


def wait_until(ready, what: str, timeout: float, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{log()[-4000:]}"
        time.sleep(0.5)
    return value


def test_a_job_scales_gpu_nodes_up_and_idle_nodes_are_removed(tmp_path, time_limit):
    cluster = FakeAutoscalingCluster(idle_timeout_minutes=0.1)
    try:
        with time_limit(600, "the autoscaling rehearsal"):
            cluster.start()
            assert cluster.worker_nodes() == []  # min_workers is 0 for every type: only the head at first
            job = cluster.start_job(["-m", "tests.autoscaling", "demand", "--workers", str(WORKERS),
                                     "--resources", json.dumps(PER_WORKER)], tmp_path / "job.log")
            log = (tmp_path / "job.log").read_text
            seen = {}  # every worker node alive at some point while the job ran, by node ID
            while job.poll() is None:
                seen.update({n["NodeID"]: n for n in cluster.worker_nodes()})
                assert len(seen) <= 8, "more nodes than cluster.yaml's max_workers"
                time.sleep(0.5)
            assert job.returncode == 0, log()[-4000:]
            assert [json.loads(line) for line in log().splitlines() if line.startswith('{"error"')] == [{"error": None}]
            # At least a node per worker (a slow start can make the autoscaler launch one more), all of a type with
            # A10Gs (the spot or the on-demand one): the accelerator_type request keeps the A100 types out.
            assert len(seen) >= WORKERS, seen
            assert all(n["Resources"].get(FAKE_GPU) == 4 and n["Resources"].get("accelerator_type:A10G") == 1
                       for n in seen.values()), [n["Resources"] for n in seen.values()]
            wait_until(lambda: not cluster.worker_nodes(), "idle nodes removed", timeout=180,
                       log=cluster.autoscaler_log)
    finally:
        left = cluster.shutdown()
    assert not left, f"processes of the rehearsal cluster outlived it: {left}"
