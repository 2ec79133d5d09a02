"""Credentials come from the environment only and never land in logs, the saved config, checkpoints, metrics or
summary.json. A short run on the moto S3 server (data and checkpoints there), whose fake key id and secret
(tests/conftest.py S3_ENV) are then searched for in every byte the run left behind.

Also covered elsewhere: checkpoints load with torch.load(weights_only=True) (tests/test_checkpoint.py), token
auth and a dashboard on localhost only (tests/test_cluster_yaml.py).
"""
from __future__ import annotations

import json
import os
import pickle
import uuid

import pytest
import s3fs

from distributed.run_folder import storage_filesystem
from distributed.trainer import fit
from tests.conftest import S3_ENV

pytestmark = pytest.mark.slow

SECRETS = [S3_ENV["AWS_SECRET_ACCESS_KEY"].encode(), S3_ENV["AWS_ACCESS_KEY_ID"].encode()]


def leaks(name: str, data: bytes) -> list[str]:
    return [f"{name} holds {s.decode()!r}" for s in SECRETS if s in data]


@pytest.mark.long
def test_credentials_never_reach_outputs(ray_local, s3_server, shards, tiny_config, capfd, time_limit):
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"sec-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(shards, f"{bucket}/shards", recursive=True)
    cfg = tiny_config(f"s3://{bucket}/shards", f"s3://{bucket}/runs", "sec", "schedule.epochs=1")
    with time_limit(150, "the run"):
        summary = fit(cfg)
    out = capfd.readouterr()
    assert summary["steps"] == 4

    found = leaks("driver stdout", out.out.encode()) + leaks("driver stderr", out.err.encode())
    found += leaks("summary", json.dumps(summary).encode())
    fs.invalidate_cache()
    files = [f for f in fs.find(f"{bucket}/runs/sec") if not f.endswith("/")]  # not pyarrow's empty "dir/" keys
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "attempts.jsonl", "state.pt"} <= names, names
    for path in files:  # every object: run folder, TensorBoard events, each checkpoint file's bytes, Ray's own
        found += leaks(path, fs.cat(path))
    # Ray's logs of this session: worker stdout/stderr, raylet, GCS, runtime env agent...
    session = ray_local._private.worker._global_node.get_session_dir_path()
    worker_output_seen = False
    for root, _, logs in os.walk(os.path.join(session, "logs")):
        for name in logs:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            found += leaks(os.path.join(root, name), data)
            worker_output_seen |= b"rank 0: se_googlenet" in data
    # The search did cover what it should: the driver's output and the workers' own log files.
    assert f"run folder s3://{bucket}/runs/sec" in out.out and worker_output_seen
    assert not found, found


def test_storage_filesystem_pickled_to_workers_holds_no_keys(s3_server):
    """Ray pickles RunConfig.storage_filesystem to its controller and workers: keys stay in the environment."""
    filesystem, path = storage_filesystem("s3://some-bucket/runs")
    assert path == "some-bucket/runs" and filesystem.max_attempts > 3
    data = pickle.dumps(filesystem)
    assert not leaks("pickled filesystem", data)
    assert pickle.loads(data).max_attempts == filesystem.max_attempts  # the retry strategy survives the trip

