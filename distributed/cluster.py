"""Connecting to Ray: the cluster at a given address, else a Ray of this process's own, bound to 127.0.0.1.

Ray's `ray.init()` without an address joins the cluster named in `<temp dir>/ray/ray_current_cluster` (written by
`ray start`, left behind when that cluster dies without `ray stop`; ray/_private/services.py:
get_ray_address_from_environment). A local run passes address="local" instead, so it never joins, or hangs on,
another cluster found on the machine. A given address must accept a connection within CONNECT_TIMEOUT_S, else
the run stops with ClusterUnreachableError. Ray's routine INFO lines are quieted; its warnings are kept.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

# A given address that accepts no connection within this many seconds stops the run (a starting head needs ~5 s).
CONNECT_TIMEOUT_S = 15.0
DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8265  # Ray's default; when another Ray holds it, the OS picks a free port instead
# Ray's own Python loggers (driver, tasks, actors) print warnings and errors only; INFO lines go to Ray's log files.
LOG_LEVEL = "WARNING"
START_ATTEMPTS = 2  # local start-ups (see start_local)

# Ray resolves 127.0.0.1 to the machine's external address unless this is off
# (ray/_private/services.py: get_node_ip_address); a laptop or test run must stay on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray Train sets each rank's root logger to INFO, which prints "Reporting training result ..." for every report of
# every rank (ray/train/v2/_internal/execution/context.py, .../logging/logging.py: configure_worker_logger). Off,
# the ranks keep LOG_LEVEL; Ray Train propagates this variable from the driver to its controller and ranks
# (ray/train/v2/_internal/constants.py: ENV_VARS_TO_PROPAGATE). A value already in the environment wins.
QUIET_ENV = {"RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}
# Node-death detection, the head's `ray start --system-config` in cluster.yaml and cluster-gcp.yaml (tests check they
# agree): the GCS declares a node dead after 5 failed health checks 1 s apart instead of Ray's 3 s apart; a node loss
# was back to training 3-6 s sooner (BENCHMARKS.md, "Recovery"). 5 failures in a row keep a busy raylet from being
# taken for dead; at 100+ nodes it is one small RPC per node per second to the GCS. A node that vanishes without
# closing its connections also waits out each check's timeout (health_check_timeout_ms, Ray's 10 s, kept).
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


class ClusterError(RuntimeError):
    """Ray cannot be joined as configured: an address that is not a Ray address, or one where nothing answers."""


class ClusterUnreachableError(ClusterError, ConnectionError):
    """A Ray address was given (run.address, --address or $RAY_ADDRESS) but nothing answers there."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to `address` (or $RAY_ADDRESS, as `ray job submit` sets it); else start a local Ray on 127.0.0.1.

    Returns "cluster" or "local" so callers can say where they run. Prints one line: where, and the dashboard URL.
    """
    source = "--address / run.address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return "cluster" if address not in (None, "local") else "local"
    if address not in (None, "local"):
        url = join_cluster(address, source)
        print(f"Ray: joined the cluster at {address}" + (f", dashboard {url}" if url else ""), flush=True)
        return "cluster"
    url = start_local(num_cpus)
    print(f"Ray: started a local Ray on 127.0.0.1 (joins no other cluster), dashboard {url} while it runs",
          flush=True)
    return "local"


def join_cluster(address: str, source: str) -> str | None:
    """ray.init(address) once it answers; ClusterUnreachableError after CONNECT_TIMEOUT_S. Returns the dashboard URL."""
    import ray

    host, port = host_port(address, source)
    if not wait_for_port(host, port, CONNECT_TIMEOUT_S):
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {address} (from {source}): nothing accepted a connection on {host}:{port} "
            f"within {CONNECT_TIMEOUT_S:.0f} s. Start that cluster (`ray up cluster.yaml`, or on one machine "
            f"`ray start --head --node-ip-address=127.0.0.1 --port={port}`), correct the address, or leave "
            f"run.address empty and unset RAY_ADDRESS to run on a local Ray of its own.")
    context = ray.init(address=address, logging_config=ray.LoggingConfig(log_level=LOG_LEVEL))
    return _http(context.dashboard_url)


def host_port(address: str, source: str) -> tuple[str, int]:
    """The host and port a Ray address connects to: HOST:PORT (the GCS), ray://HOST:PORT (Ray Client) or "auto"."""
    if address == "auto":  # Ray's own lookup (the ray_current_cluster file, else the one GCS running here)
        from ray._private.services import canonicalize_bootstrap_address_or_die

        address = canonicalize_bootstrap_address_or_die("auto")
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if scheme in ("http", "https"):
        raise ClusterError(f"{source} is {address!r}: that is a dashboard / job API URL, which `ray job submit` "
                           "takes; a run joins a cluster at its GCS address HOST:6379 (or ray://HOST:10001). "
                           "Submit with `ray job submit` (docs/jobs.md) or give the GCS address.")
    if scheme not in ("", "ray") or not host or not port.isdigit():
        raise ClusterError(f"{source} is {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default), "
                           "ray://HOST:PORT (Ray Client, 10001 by default), 'auto', or nothing for a local Ray")
    return host.strip("[]"), int(port)


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """True as soon as host:port accepts a TCP connection; False if it has not within timeout_s seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(left, 2.0))):
                return True
        except OSError:
            if deadline - time.monotonic() < 1.0:
                return False
            time.sleep(1.0)


def start_local(num_cpus: int | None) -> str:
    """Start a new Ray on 127.0.0.1 with its dashboard (and so the State API) there; return the dashboard URL.

    A busy machine can miss Ray's fixed start-up windows (the raylet waits 15 s for its agents' ports); the
    processes of a failed attempt are ended and Ray is started once more, with the imports now cached.
    """
    import ray
    from ray._private import ray_constants

    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # already imported: patch the constant read at init time
    for attempt in range(1, START_ATTEMPTS + 1):
        before = _child_pids()
        try:
            return _start_local_once(num_cpus)
        except Exception as e:
            if attempt == START_ATTEMPTS:
                raise
            ray.shutdown()
            _end_processes(_child_pids() - before)
            print(f"Ray: the local Ray did not start ({str(e).splitlines()[0]}); starting it once more", flush=True)
    raise AssertionError("unreachable")


def _start_local_once(num_cpus: int | None) -> str:
    import ray

    port = free_port(DASHBOARD_HOST, DASHBOARD_PORT)
    url = f"http://{DASHBOARD_HOST}:{port}"
    # Ray's processes inherit this: their State API calls (Ray Train's PlacementGroupCleaner asks whether the
    # controller is alive) go to this Ray's dashboard, not to whichever cluster Ray's own lookup would find.
    with _environ(RAY_API_SERVER_ADDRESS=url):
        context = ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus,
                           include_dashboard=True, dashboard_host=DASHBOARD_HOST, dashboard_port=port,
                           logging_config=ray.LoggingConfig(log_level=LOG_LEVEL), log_to_driver=True)
    return _http(context.dashboard_url) or url


def free_port(host: str, preferred: int) -> int:
    """`preferred` if nothing listens on it, else a port the OS reports free."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free TCP port on {host}")


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables for the processes started inside the block; restore them after."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _end_processes(pids: set[int]) -> None:
    """Terminate these processes (children of this one), then kill those still alive after 5 s."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
            procs[-1].terminate()
    for proc in psutil.wait_procs(procs, timeout=5)[1]:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _http(dashboard_url: str | None) -> str | None:
    if not dashboard_url:
        return None
    return dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
