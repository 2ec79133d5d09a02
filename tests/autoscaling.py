"""An autoscaling rehearsal on one machine: Ray's fake multi-node provider with cluster.yaml's node types.

`FakeAutoscalingCluster` does what `ray.cluster_utils.AutoscalingCluster.start()` does (a head started with
RAY_FAKE_CLUSTER=1 and `--autoscaling-config`, the autoscaler polled every second), minus its `ray stop --force`,
which would end every Ray on the machine. Its head runs with token auth on 127.0.0.1, a free GCS port, its own
temp dir and `--block`, so SIGTERM to it stops the head; the worker nodes the provider started (in the head's
autoscaler process, never stopped by it) carry the cluster's RAY_TMPDIR and are ended by that mark.

`rehearsal_config` maps cluster.yaml onto the fake provider (docs/cluster.md, "Autoscaling rehearsal"): the same
node type names, min/max workers, priorities and custom resources; 1 CPU per worker type; `GPU: n` becomes the
custom resource `fake_GPU: n` (this machine has no GPU); the head type keeps `head: 2` and advertises no CPU, so
no training worker lands on it; cloud `node_config`s and setup commands are dropped; `idle_timeout_minutes` is
shortened.

    python -m tests.autoscaling demand --workers 2 --resources '{"CPU": 1, "fake_GPU": 4}'

is the job a test submits: a TorchTrainer asking for that many workers, each reporting once.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.multinode import (RAY_CLI, REPO, _enable_token_auth, _free_port, _processes_with_env, _stay_on_loopback,
                              reap)

HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name (FAKE_HEAD_NODE_TYPE)
FAKE_GPU = "fake_GPU"


def rehearsal_config(cluster_yaml: Path, gcs_address: str, idle_timeout_minutes: float) -> dict:
    """cluster.yaml's cluster for the fake multi-node provider (see the module docstring)."""
    real = yaml.safe_load(cluster_yaml.read_text())
    types = {}
    for name, spec in real["available_node_types"].items():
        resources = {(FAKE_GPU if k == "GPU" else k): v for k, v in spec["resources"].items() if v}
        if name == real["head_node_type"]:
            types[HEAD_TYPE] = {"resources": {**resources, "CPU": 0}, "node_config": {}, "max_workers": 0}
            continue
        resources["CPU"] = 1  # a real worker's 48-96 vCPUs, scaled to this machine
        types[name] = {"resources": resources, "node_config": {}, "min_workers": spec.get("min_workers", 0),
                       "max_workers": spec["max_workers"], **({"priority": spec["priority"]} if "priority" in spec
                                                              else {})}
    return {
        "cluster_name": real["cluster_name"] + "-rehearsal",
        "max_workers": real["max_workers"],
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": real["auth"]["ssh_user"]},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """A head with Ray's autoscaler and the fake multi-node provider; see the module docstring."""

    def __init__(self, cluster_yaml: Path = REPO / "cluster.yaml", idle_timeout_minutes: float = 0.1):
        self.temp_dir = tempfile.mkdtemp(prefix="as", dir="/tmp")  # short: Ray's socket paths stay < 108 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = rehearsal_config(cluster_yaml, self.address, idle_timeout_minutes)
        self.config_path = Path(self.temp_dir) / "autoscaling.json"
        self.log = Path(self.temp_dir) / "head.log"
        self.proc: subprocess.Popen | None = None
        self.global_state = None

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="token", RAY_TMPDIR=self.temp_dir, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def start(self) -> FakeAutoscalingCluster:
        _stay_on_loopback()
        _enable_token_auth()
        os.makedirs(os.path.join(self.temp_dir, "ray"), exist_ok=True)
        self.config_path.write_text(json.dumps(self.config))
        head = self.config["available_node_types"][HEAD_TYPE]["resources"]
        cmd = [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--autoscaling-config={self.config_path}", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={head.get('CPU', 0)}", "--num-gpus=0",
               f"--resources={json.dumps({k: v for k, v in head.items() if k != 'CPU'})}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               "--disable-usage-stats"]
        # As AutoscalingCluster.start(): the fake provider's switch and a 1 s autoscaler loop. No 30 s drain when
        # the head gets SIGTERM: nothing to drain. The autoscaler's metrics on a free port, not Ray's default 44217.
        env = self.env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                       RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", AUTOSCALER_METRIC_PORT=str(_free_port()))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._connect_state(timeout=180)
        return self

    def _connect_state(self, timeout: float) -> None:
        from ray._private.state import GlobalState
        from ray._raylet import GcsClientOptions

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                state = GlobalState()
                state._initialize_global_state(GcsClientOptions.create(self.address, None, allow_cluster_id_nil=True,
                                                                       fetch_cluster_id_if_nil=False))
                if state.node_table():
                    self.global_state = state
                    return
            except Exception:  # noqa: BLE001 -- the GCS is not up yet
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def worker_nodes(self) -> list[dict]:
        """Alive nodes other than the head, each as {"NodeID", "Resources", ...} from the GCS node table."""
        return [n for n in self.global_state.node_table() if n["Alive"] and "head" not in n["Resources"]]

    def start_job(self, argv: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "w") as log:
            return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=self.env(RAY_ADDRESS=self.address),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def autoscaler_log(self) -> str:
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("monitor*")) if p.is_file())

    def shutdown(self) -> list[str]:
        """SIGTERM the head (it stops its processes), then end the provider's nodes; returns what had to be killed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        nodes = _processes_with_env("RAY_TMPDIR", self.temp_dir)
        for p in nodes:  # the provider's worker nodes outlive the head's autoscaler, which started them
            try:
                p.terminate()
            except Exception:  # noqa: BLE001 -- gone already
                pass
        return reap(nodes, timeout=20)


def demand(workers: int, resources: dict) -> None:
    """A Ray Train job asking for `workers` workers with `resources` each; every worker reports once."""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address=os.environ["RAY_ADDRESS"])

    def train_fn():
        ray.train.report({"node": ray.get_runtime_context().get_node_id()})

    storage = tempfile.mkdtemp(prefix="demand-")
    result = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=workers, resources_per_worker=resources),
                          run_config=RunConfig(name="demand", storage_path=storage)).fit()
    print(json.dumps({"error": repr(result.error) if result.error else None}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["demand"])
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--resources", type=json.loads, required=True, help='per worker, e.g. {"CPU": 1, "fake_GPU": 4}')
    args = p.parse_args()
    demand(args.workers, args.resources)
