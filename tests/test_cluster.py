"""distributed/cluster.py: a local run starts its own Ray and never joins another; a dead address stops the run.

The tests that start Ray do it in a subprocess whose Ray temp root ($RAY_TMPDIR) is a private folder: Ray reads
and writes `ray_current_cluster` and its session folders under `$RAY_TMPDIR/ray` (ray/_common/utils.py:
get_default_system_temp_dir, get_ray_address_file), so a stale file planted there cannot reach, and no file of
ours can disturb, any other Ray on the machine (their files are under /tmp/ray).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from distributed import cluster
from distributed.cluster import ClusterError, ClusterUnreachableError, free_port, host_port, init_ray, wait_for_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_root():
    """A private Ray temp root with a stale `ray_current_cluster` naming a dead GCS; yields (root, address).

    Short and under /tmp: Ray's socket paths (`<root>/ray/session_*/sockets/...`) must stay under 107 bytes.
    """
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    address = f"127.0.0.1:{dead_port()}"
    os.makedirs(os.path.join(root, "ray"))
    with open(os.path.join(root, "ray", "ray_current_cluster"), "w") as f:
        f.write(address)
    yield root, address
    shutil.rmtree(root, ignore_errors=True)


def test_ray_itself_would_join_the_stale_cluster(ray_root, monkeypatch):
    """The fixture is the trap of the issue: Ray's own address lookup (what `ray.init()` uses) picks the dead GCS."""
    from ray._private.services import canonicalize_bootstrap_address

    root, address = ray_root
    monkeypatch.setenv("RAY_TMPDIR", root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    found = canonicalize_bootstrap_address(None)
    assert found is not None and found.endswith(":" + address.rsplit(":", 1)[1]), found


LOCAL_RUN = """
import json, os, ray
from distributed.cluster import init_ray
where = init_ray(num_cpus=1)
task_env = ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).remote())
print(json.dumps({"where": where, "gcs": ray.get_runtime_context().gcs_address, "task_env": task_env}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_run_starts_its_own_ray_despite_a_stale_ray_current_cluster(ray_root):
    root, stale = ray_root
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=root, PYTHONPATH=REPO)
    # A hang guard only: before the fix this joined the dead GCS and retried for minutes.
    p = subprocess.run([sys.executable, "-c", LOCAL_RUN], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    started = [line for line in p.stdout.splitlines() if line.startswith("Ray: started a local Ray")]
    assert len(started) == 1, p.stdout
    dashboard = started[0].split("dashboard ")[1].split()[0]
    assert dashboard.startswith("http://127.0.0.1:"), started
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["where"] == "local"
    assert result["gcs"] != stale and result["gcs"].startswith("127.0.0.1:"), result
    # Ray's processes ask this Ray's dashboard for the State API, not the cluster Ray's lookup would find.
    assert result["task_env"] == dashboard, result


def test_init_ray_with_a_dead_ray_address_stops_naming_it_and_the_fix(monkeypatch):
    import ray

    address = f"127.0.0.1:{dead_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", raising=False)  # restored after the test
    # Another test of this session may have started Ray in this process; init_ray must not take that shortcut.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterUnreachableError) as e:
        init_ray()
    message = str(e.value)
    for part in (address, "$RAY_ADDRESS", "within 1 s", "ray start --head", "unset RAY_ADDRESS"):
        assert part in message, (part, message)


def test_an_explicit_dead_address_names_its_source(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterUnreachableError, match="run.address"):
        init_ray(f"ray://127.0.0.1:{dead_port()}")


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("ray://head.example:10001", ("head.example", 10001)),
    ("[::1]:6379", ("::1", 6379)),
])
def test_host_port(address, expected):
    assert host_port(address, "run.address") == expected


@pytest.mark.parametrize("address, says", [
    ("http://127.0.0.1:8265", "ray job submit"),
    ("head.example", "expected HOST:PORT"),
    ("grpc://head:6379", "expected HOST:PORT"),
])
def test_host_port_rejects_what_is_not_a_ray_address(address, says):
    with pytest.raises(ClusterError, match=says):
        host_port(address, "run.address")


def test_wait_for_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert wait_for_port("127.0.0.1", server.getsockname()[1], timeout_s=5.0)
    assert not wait_for_port("127.0.0.1", dead_port(), timeout_s=0.5)


def test_free_port_prefers_the_given_port_and_moves_when_it_is_taken():
    port = dead_port()
    assert free_port("127.0.0.1", port) == port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        other = free_port("127.0.0.1", port)
    assert other != port and other > 0
