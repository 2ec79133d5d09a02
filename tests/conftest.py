"""Shared fixtures: a real S3 API server (moto, server mode) on 127.0.0.1 in its own process, a session-wide
local Ray on loopback, a tiny prepared dataset with a matching config, and a time limit for long tests."""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from unittest import mock

import pytest

S3_ENV = {
    # Distinctive fakes, so tests/test_security.py can search every output for them.
    "AWS_ACCESS_KEY_ID": "AKIATESTKEYIDNEVERLOGGED",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
    "AWS_DEFAULT_REGION": "us-east-1",
    # botocore >= 1.36 sends checksums by default; keep requests plain for the test server (s3fs#931).
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server process on loopback behind a TCP proxy in this process, at `endpoint`.

    `stop()`/`start()` take the endpoint away and back for chaos tests: stop closes the listening socket and cuts
    every open connection (clients see "connection refused" or a reset, as in a storage outage), while moto and
    the buckets' contents live on, as a real object store's do. `stop_on(pattern)` arms a trip-wire: the first
    request whose bytes match it is not forwarded and stops the endpoint then, at exactly that request. `close()`
    ends the moto process; so does the exit of the process that started it, whichever way it exits short of
    SIGKILL.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._backend_port = _free_port()
        self.backend_endpoint = f"http://127.0.0.1:{self._backend_port}"  # moto itself, reachable during stop()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._tripwire: re.Pattern | None = None
        self.tripped = threading.Event()

    def stop_on(self, pattern: bytes | None) -> threading.Event:
        """Stop at the first client request matching `pattern` (a regex on the bytes sent, e.g. an HTTP request
        line); that request never reaches moto. Returns the event set when it trips. None disarms."""
        if pattern is None:
            self._tripwire = None
            return self.tripped
        self.tripped.clear()
        self._tripwire = re.compile(pattern)
        return self.tripped

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("S3Server.start() after close()")
        if self.proc is None:
            self._start_moto()
            atexit.register(self.close)
        if self._listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="s3-proxy").start()

    def _start_moto(self) -> None:
        backend = self.backend_endpoint
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._backend_port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(backend + "/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError(f"moto server did not start on {backend}")

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed by stop()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._backend_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if watch and (wire := self._tripwire) is not None and wire.search(data):
                    self._tripwire = None
                    self.stop()
                    self.tripped.set()
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
            with self._lock:
                self._conns.discard(s)

    def stop(self) -> None:
        """Storage outage: refuse new connections and reset the open ones; moto keeps its state."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close alone does not)
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.stop()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def reset(self) -> None:
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=5)


@contextlib.contextmanager
def s3_environment():
    """Start an S3Server and put its endpoint and keys in the environment; undo both on exit.

    Endpoint and credentials come from the environment, as on a real cluster (s3fs, pyarrow and Ray workers
    started from this process all read them). Also used by benchmarks/data_pipeline.py.
    """
    server = S3Server()
    server.start()
    try:
        with mock.patch.dict(os.environ, S3_ENV, AWS_ENDPOINT_URL=server.endpoint):
            yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_server():
    with s3_environment() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns its name. Use URLs like f"s3://{s3_bucket}/path"."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


# Keep every Ray started by the tests (in-process or `ray start`) on 127.0.0.1; see distributed/cluster.py.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller takes at most one report from each worker per poll of the workers
# (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default; a worker's result queue holds one report and the next waits).
# A tiny run here reports a checkpoint every few tenths of a second, so at 2 s its reports queue up and each fit
# ends 5-8 s after its last step; 0.5 s takes that off every fit. A real run reports every few minutes: the
# clusters keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session, bound to loopback, 2 CPUs.

    Started after the S3 server so that Ray's processes inherit its endpoint and keys from the environment.
    """
    import ray

    from distributed.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


# -- a tiny training setup (as in tests/test_train_ray.py): 4 steps per epoch, 20-40 s per run on 2 cores --------

TINY = ["data.image_size=32", "data.global_batch_size=16", "data.eval_batch_size=16", "data.loader_workers=1",
        "schedule.epochs=2", "schedule.warmup_epochs=0.5", "run.checkpoint_every_steps=2", "run.log_every_steps=2"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """3 classes x 24 train images (one truncated, excluded by prepare) -> 35 -> 71 // 16 = 4 steps/epoch."""
    from data import make_sample, prepare_dataset

    root = tmp_path_factory.mktemp("sample")
    make_sample(str(root / "raw"), classes=3, per_class=24, val_per_class=8, test=4, seed=0)
    prepare_dataset(str(root / "raw"), str(root / "shards"), shard_size=16, log=lambda s: None)
    return str(root / "shards")


def tiny_overrides(shards: str, storage: str, name: str, *extra: str) -> list[str]:
    return [f"data.url={shards}", f"run.storage_path={storage}", f"run.name={name}", *TINY, *extra]


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(shards, storage, name, *overrides) -> Config: configs/demo.yaml shrunk by TINY."""
    from distributed.config import load_config

    def make(shards: str, storage: str, name: str, *extra: str):
        return load_config("configs/demo.yaml", tiny_overrides(shards, storage, name, *extra))

    return make


@contextlib.contextmanager
def _time_limit(seconds: float, what: str):
    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def time_limit():
    """`with time_limit(120, "the run"):` raises TimeoutError in the test's thread past the limit (SIGALRM)."""
    return _time_limit


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    batches gain nothing from intra-op threads, and on a shared 2-core machine their spin-waits cost 10x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a multi-node Ray cluster on 127.0.0.1: a head and two worker nodes (tests/multinode.py) -----------------------

MULTINODE_WORKERS = {"node_a": 2, "node_b": 2}  # CPUs per worker node: a 2-rank run fits on either node alone


@pytest.fixture(scope="module")
def multinode_cluster(s3_server):
    """One cluster per test module, shared by its tests; started after the S3 server, whose endpoint and keys its
    nodes inherit. Stops only its own processes and fails the module if any outlives it."""
    from tests.multinode import MultiNodeCluster

    cluster = MultiNodeCluster(MULTINODE_WORKERS).start()
    try:
        yield cluster
    finally:
        left = cluster.shutdown()
    assert not left, f"processes of the multi-node cluster outlived it: {left}"


@pytest.fixture
def multinode(multinode_cluster):
    """The module's cluster as a test expects it: the MULTINODE_WORKERS nodes alive, none draining. After the test,
    no training worker may be left on any node (Ray Train ends them when a run ends, even a run whose driver died)."""
    multinode_cluster.reset()
    yield multinode_cluster
    left = multinode_cluster.wait_no_train_workers(timeout=60)
    assert not left, f"training worker processes outlived the test: {left}"
