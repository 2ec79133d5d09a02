"""Connecting to Ray: a running cluster when one is given, else a local Ray bound to loopback only."""
from __future__ import annotations

import os

# Ray resolves 127.0.0.1 to the machine's external address unless this is off
# (ray/_private/services.py: get_node_ip_address); a laptop or test run must stay on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to `address` (or $RAY_ADDRESS, as `ray job submit` sets it); else start a local Ray on 127.0.0.1.

    Returns "cluster" or "local" so callers can say where they run.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.update(LOOPBACK_ENV)
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return "cluster" if address else "local"
    if address:
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    ray_constants.ENABLE_RAY_CLUSTER = False  # already imported: patch the constant read at init time
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus, log_to_driver=True)
    return "local"
