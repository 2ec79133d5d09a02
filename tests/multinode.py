"""A real multi-node Ray cluster on 127.0.0.1 for node-level chaos tests, and the processes tests start on it.

`ray.cluster_utils.Cluster` (what Ray's own multi-node tests use): a head and worker nodes, each its own raylet
with its own CPU count and a custom resource named after it ({"node_a": 1}), so work can be placed on a chosen
node. The head advertises no CPUs, as cluster.yaml's head advertises no GPUs: training workers land on worker
nodes only, while drivers (and Ray Train's controller, which follows its driver) stay on the head.

Token auth as on the real cluster (RAY_AUTH_MODE=token, the token this process uses: Ray's default
~/.ray/auth_token, created by Ray if missing, as `ray.init()` does). Its own temp dir, free ports, loopback only:
nothing here is visible to another Ray on the machine (no `ray_current_cluster` file in /tmp/ray), and
`shutdown()` ends only the processes this cluster started (never `ray stop --force`).

Faults, as a cloud or an operator would cause them:
- `remove_node(name)`: the node vanishes: raylet and every process of the node SIGKILLed at once.
- `drain(name, deadline_s)`: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds`,
  the call a spot-reclaim notice triggers. Ray does not end a busy drained node itself (an idle one exits at
  once): the provider does at the deadline, `remove_node` here.
- `add_node(name, cpus)`: a node joins.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import psutil

from distributed.cluster import HEAD_SYSTEM_CONFIG

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")
TRAIN_WORKER = "RayTrainWorker"  # in the process title of Ray Train's worker actors
# What a driver of `jobs.train` prints: where each attempt starts (distributed/worker.py) and each progress line
# (distributed/monitor.py; every step with run.log_every_steps=1).
ATTEMPT_START = re.compile(r"rank 0: .* start at epoch \d+ (?:batch|sample) \d+ \(step (\d+), from (\S+)\)")
STEP_LINE = re.compile(r"epoch \d+/\d+ step (\d+)/\d+ loss")


@dataclass
class WorkerNode:
    name: str
    node: object  # ray._private.node.Node
    num_cpus: float

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def raylet(self) -> psutil.Process:
        return psutil.Process(self.node.all_processes["raylet"][0].process.pid)


def _stay_on_loopback() -> None:
    """Ray would give its nodes the machine's external address though they listen on 127.0.0.1 (and a driver
    would then wait for a GCS it cannot reach): the switch `init_ray` flips too (distributed/cluster.py)."""
    from ray._private import ray_constants

    from distributed.cluster import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import time: patch the constant too


def _enable_token_auth() -> None:
    """Token auth for this process and the nodes it starts, as `ray.init()` sets it up for a new local Ray."""
    from ray._private.authentication.authentication_token_setup import (
        enable_token_auth_by_default, ensure_token_if_auth_enabled)

    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise RuntimeError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: the multi-node fixture runs with token auth")
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


class MultiNodeCluster:
    """A head (no CPUs) and named worker nodes on 127.0.0.1; see the module docstring."""

    def __init__(self, workers: dict[str, float]):
        self.temp_dir = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths stay < 108 bytes
        self.port = _free_port()  # the GCS's, chosen here so that the nodes' environment can name it
        self._initial = dict(workers)
        self.cluster = None
        self.nodes: dict[str, WorkerNode] = {}
        self.drained: set[str] = set()

    @contextlib.contextmanager
    def _node_env(self):
        """While a node starts in this process: the environment its processes inherit, and this process's internal-KV
        client kept. RAY_TMPDIR: Ray writes the newest cluster's address to $RAY_TMPDIR/ray/ray_current_cluster,
        where a plain `ray.init()` elsewhere on the machine would find and join it. RAY_ADDRESS: Ray Train's
        PlacementGroupCleaner (State API) would otherwise look for "the" cluster among every Ray on the machine and
        say so every second. The KV client: each `Node` made here points Ray's process-wide internal KV at its own
        GCS; the suite's ray_local would then write there, and once this cluster is gone a KV call retries for 60 s
        and Ray ends the whole process ("Failed to connect to GCS within 60 seconds"): pytest, with no summary."""
        from ray.experimental import internal_kv

        kv = internal_kv.internal_kv_get_gcs_client()
        try:
            with mock.patch.dict(os.environ, RAY_TMPDIR=self.temp_dir, RAY_ADDRESS=self.address):
                yield
        finally:
            if kv is None:
                internal_kv._internal_kv_reset()
            else:
                internal_kv._initialize_internal_kv(kv)

    def start(self) -> MultiNodeCluster:
        """Start the head and the initial worker nodes. On a heavily loaded machine a node can miss one of Ray's
        start-up timeouts (a raylet must register within 30 s): then everything is stopped and started once more."""
        _stay_on_loopback()
        _enable_token_auth()
        try:
            return self._start()
        except Exception as e:  # noqa: BLE001 -- any start-up failure: clean up, one more try
            print(f"multi-node cluster: start-up failed ({type(e).__name__}: {e}); starting it again. "
                  f"Its logs:\n{self._log_tails()}", flush=True)
            self.shutdown()
            self.port = _free_port()
            return self._start()

    def _start(self) -> MultiNodeCluster:
        from ray.cluster_utils import Cluster

        os.makedirs(os.path.join(self.temp_dir, "ray"), exist_ok=True)
        head = {"node_ip_address": "127.0.0.1", "gcs_server_port": self.port, "num_cpus": 0, "resources": {"head": 2},
                "temp_dir": self.temp_dir, "dashboard_agent_listen_port": _free_port(),  # not Ray's default 52365
                # The dashboard gives the State API Ray Train's PlacementGroupCleaner polls; loopback, a free port.
                "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
                "_system_config": HEAD_SYSTEM_CONFIG}  # node-death detection as cluster.yaml's head sets it
        with self._node_env():
            self.cluster = Cluster(initialize_head=True, head_node_args=head)
        for name, cpus in self._initial.items():
            self.add_node(name, cpus)
        return self

    def _log_tails(self, lines: int = 5) -> str:
        """The last error lines of the session's logs (what a failed start-up left)."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        tails = []
        for path in sorted(logs.glob("*.out")) + sorted(logs.glob("*.log")) if logs.is_dir() else []:
            text = [t[:300] for t in path.read_text(errors="replace").splitlines()
                    if "Check failed" in t or " C " in t[:40] or " E " in t[:40] or "ERROR" in t[:40]]
            if text:
                tails.append(f"== {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(tails)

    @property
    def address(self) -> str:
        """The GCS address, host:port (what `ray.init(address=...)` and `ray drain-node --address` take)."""
        return f"127.0.0.1:{self.port}"

    def add_node(self, name: str, num_cpus: float) -> WorkerNode:
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists already; nodes: {sorted(self.nodes)}")
        with self._node_env():
            node = self.cluster.add_node(node_ip_address="127.0.0.1", num_cpus=num_cpus, resources={name: 1},
                                         temp_dir=self.temp_dir)
        self.nodes[name] = WorkerNode(name, node, num_cpus)
        return self.nodes[name]

    def remove_node(self, name: str) -> float:
        """The node vanishes: every process of it SIGKILLed (its raylet first). Returns the time.time() of it."""
        node = self.nodes.pop(name)
        self.drained.discard(name)
        try:
            workers = _children(node.raylet)
        except psutil.Error:  # a drained node that went idle exits by itself
            workers = []
        when = time.time()
        self.cluster.remove_node(node.node, allow_graceful=False)
        for p in workers:  # on a real machine they die with it; here they would notice the raylet gone in a while
            with contextlib.suppress(psutil.Error):
                p.kill()
        return when

    def drain(self, name: str, deadline_s: int, reason: str = "DRAIN_NODE_REASON_PREEMPTION") -> float:
        """`ray drain-node` against this cluster with its token; returns the time.time() it was accepted."""
        cmd = [RAY_CLI, "drain-node", "--address", self.address, "--node-id", self.nodes[name].node_id,
               "--reason", reason, "--reason-message", f"multinode fixture: {name}",
               "--deadline-remaining-seconds", str(deadline_s)]
        p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"`ray drain-node` exited {p.returncode}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        self.drained.add(name)
        return time.time()

    def reset(self) -> None:
        """Back to the initial shape: drained nodes removed (drained here, or by a run through Ray's DrainNode),
        dead ones forgotten, missing initial nodes added (fresh raylets)."""
        draining = set(self.cluster.global_state.get_draining_nodes())
        for name in [n for n, node in self.nodes.items() if n in self.drained or node.node_id in draining
                     or not self.node_alive(n)]:
            self.remove_node(name)
        self.drained.clear()
        for name, cpus in self._initial.items():
            if name not in self.nodes:
                self.add_node(name, cpus)

    def refresh_train_view(self) -> None:
        """Make Ray Train see the cluster's nodes as they are now. Its elastic policy sizes a run from the resources
        Ray Data's AutoscalingCoordinator has reserved for it. That actor is detached (it outlives jobs) and looks at
        the nodes every 20 s: a run would be sized for the old shape for up to 20 s after a node change. This asks
        it for one look now (its `recompute` path), from a driver of its own."""
        self._train_view("look")

    def reset_train_view(self) -> None:
        """Between runs: end the AutoscalingCoordinator; the next run starts a fresh one. Besides its 20 s-old view,
        it keeps a run's resource request for 180 s unless the run cancels it, which a killed driver never does, so
        a run started after such a test would get fewer ranks than the nodes hold."""
        self._train_view("reset")

    def _train_view(self, action: str) -> None:
        p = subprocess.run([sys.executable, "-c", _TRAIN_VIEW, action], cwd=REPO, env=self.env(), capture_output=True,
                           text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"{action} of Ray Train's view of the nodes failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")

    def node_alive(self, name_or_id: str) -> bool:
        """Alive in the GCS's node table (a removed node reads dead once the GCS has noticed)."""
        node_id = self.nodes[name_or_id].node_id if name_or_id in self.nodes else name_or_id
        for n in self.cluster.global_state.node_table():
            if n["NodeID"] == node_id:
                return n["Alive"]
        raise KeyError(f"no node {name_or_id} in the cluster's node table")

    def train_workers(self, name: str | None = None) -> list[psutil.Process]:
        """Ray Train worker processes on node `name` (all worker nodes by default): children of its raylet."""
        found = []
        for node in [self.nodes[name]] if name else self.nodes.values():
            found += [p for p in _children(node.raylet) if _is_train_worker(p)]
        return found

    def nodes_with_train_workers(self) -> list[str]:
        return [name for name in self.nodes if self.train_workers(name)]

    def wait_no_train_workers(self, timeout: float) -> list[str]:
        """Wait until no node runs a training worker; return those still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.train_workers() and time.monotonic() < deadline:
            time.sleep(0.5)
        return [f"{p.pid} on {name}" for name in self.nodes for p in self.train_workers(name)]

    def env(self, **extra: str) -> dict:
        """Environment for a driver or a `ray` command on this cluster: its address, token auth, temp dir."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_TMPDIR=self.temp_dir,
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def start_driver(self, argv: list[str], log_path: Path, **env: str) -> subprocess.Popen:
        """Start `python ARGV` from the repository root as a driver on this cluster (it runs on the head), in a
        session of its own (os.killpg ends it and nothing else); stdout and stderr go to `log_path`."""
        log = open(log_path, "w")
        try:
            return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=self.env(**env), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster and of the drivers started on it: they all carry its RAY_TMPDIR."""
        return _processes_with_env("RAY_TMPDIR", self.temp_dir)

    def shutdown(self) -> list[str]:
        """Stop every node; SIGKILL what is left of ours after 30 s. Returns what had to be killed (should be [])."""
        if self.cluster is not None:
            # Node by node, as Cluster.shutdown() does, without its reset of this process's internal-KV client,
            # which a Ray this process is connected to (the suite's ray_local) still uses.
            for node in self.nodes.values():
                self.cluster.remove_node(node.node)
            self.nodes.clear()
            self.cluster.global_state.disconnect()  # its GCS client, before the GCS goes
            if self.cluster.head_node is not None:
                self.cluster.remove_node(self.cluster.head_node)
            self.cluster = None
        left = reap(self.processes(), timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


# The driver behind MultiNodeCluster.refresh_train_view and reset_train_view; argv[1]: "look" or "reset".
_TRAIN_VIEW = """
import sys, time
import ray
from distributed.cluster import init_ray
init_ray()
def coordinator():
    try:
        return ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # none yet (no Ray Train run so far, or ended): the next run creates it, with a fresh look
        return None
if (actor := coordinator()) is not None and sys.argv[1] == "look":
    ray.get(actor.get_reserved_resources.remote("multinode-fixture", recompute=True), timeout=60)
elif actor is not None:
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while coordinator() is not None:  # its name is free once the GCS has it dead
        assert time.monotonic() < deadline, "the AutoscalingCoordinator outlived ray.kill by 30 s"
        time.sleep(0.2)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children()
    except psutil.Error:
        return []


def _is_train_worker(p: psutil.Process) -> bool:
    try:
        return TRAIN_WORKER in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _processes_with_env(key: str, value: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["environ"]):
        try:
            if (p.info["environ"] or {}).get(key) == value:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def checkpoint_uploaded(fs, path: str) -> bool:
    """Every file the checkpoint's manifests list is on storage (fsspec `fs`) at its size.

    Ray uploads a checkpoint's files in parallel, so a manifest on storage says nothing about the other files: a
    node lost during an upload left `manifest.rank0.json` there without `state.pt` (seen on this fixture).
    """
    try:
        head = json.loads(fs.cat(f"{path}/manifest.rank0.json"))
        manifests = [head] + [json.loads(fs.cat(f"{path}/manifest.rank{r}.json")) for r in range(1, head["writers"])]
        return all(fs.size(f"{path}/{name}") == meta["bytes"] for m in manifests for name, meta in m["files"].items())
    except FileNotFoundError:
        return False


def uploaded_checkpoints(fs, folder: str) -> list[str]:
    """Names of the run folder's checkpoints whose files are all on storage (`checkpoint_uploaded`), oldest first."""
    from distributed.checkpoint import NAME

    fs.invalidate_cache()
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
    except FileNotFoundError:  # nothing written yet (exists() and ls() disagree on S3 while the folder fills)
        return []
    return [n for n in names if NAME.fullmatch(n) and checkpoint_uploaded(fs, f"{folder}/{n}")]


def steps_lost(output: str) -> tuple[int, int]:
    """From a driver's output (run.log_every_steps=1): (steps trained before the first restart minus the step that
    restart restored, that restored step). Raises AssertionError if the output shows no restart."""
    starts = list(ATTEMPT_START.finditer(output))
    assert len(starts) > 1, f"no restart in the driver's output:\n{output[-3000:]}"
    restored = int(starts[1].group(1))
    before = [int(s) for s in STEP_LINE.findall(output[:starts[1].start()])]
    return max(before, default=restored) - restored, restored


def trained_keys(folder: str, epoch: int) -> collections.Counter:
    """The keys trained in `epoch` (corrupt ones included), from the per-step sample logs the ranks write with
    run.sample_log (`samples.rank<r>.jsonl`, distributed/loop.py), counting each step as trained by the attempt
    that trained it last: a restart redoes the steps after its checkpoint. Rank 0 is in every attempt, so its log,
    in time order, names the world size of that attempt; each rank's last record of the step at that size counts."""
    logs = {int(re.search(r"rank(\d+)", p.name).group(1)): [json.loads(line) for line in p.read_text().splitlines()]
            for p in Path(folder).glob("samples.rank*.jsonl")}
    final_world = {r["step"]: r["world"] for r in logs.get(0, []) if r["epoch"] == epoch}
    keys: collections.Counter = collections.Counter()
    for step, world in final_world.items():
        for rank in range(world):
            last = [r for r in logs.get(rank, []) if (r["epoch"], r["step"], r["world"]) == (epoch, step, world)]
            assert last, f"rank {rank} of {world} logged no keys for epoch {epoch} step {step} in {folder}"
            keys.update(last[-1]["keys"] + last[-1]["corrupt"])
    return keys


def epoch_sample_set(cfg, epoch: int) -> collections.Counter:
    """Every sample of `epoch` once, as the run's training order defines it (data.TrainLoader at one rank)."""
    from data import TrainLoader
    from distributed.loop import stream_options

    loader = TrainLoader(stream_options(cfg), 0, 1)
    try:
        return collections.Counter(k for b in loader.epoch(epoch, 0) for k in b["key"] + b["corrupt"])
    finally:
        loader.close()


def reap(procs: list[psutil.Process], timeout: float = 30.0) -> list[str]:
    """Wait up to `timeout` for `procs` to exit; SIGKILL and name those still running."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
            p.send_signal(signal.SIGKILL)
    return names
