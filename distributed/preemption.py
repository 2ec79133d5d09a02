"""Preemption: SIGTERM to a worker (spot reclaim, node shutdown, pod eviction) and Ray node drains.

SIGTERM sets a flag; Ray's drain notice (`ray.train.get_preemption_info()`) is another. The loop reads both at
its next synchronisation (`monitor.StepStats.sync`, every `run.log_every_steps` steps), where they are summed
across ranks, so every rank takes the same decision at the same step: every rank reports a checkpoint at the step
reached (uploaded before the call returns), then `Preemption.stand_down` ends the attempt as a preemption.

Ray Train 2.60 charges a restart to `FailureConfig.max_preemption_failures` (not `max_failures`) only for its own
`PreemptionError` (raised once the workers of a drained node are done or its deadline passed) or a worker killed
with its drained node; any exception the training function raises, or its process exiting, is a failure, and a
training function that returns ends the run as finished. Its FailurePolicy is not pluggable. So the supported
way to be counted as a preemption is a drain: after the checkpoint, the ranks on the node being reclaimed drain
it again through Ray's DrainNode call (reason PREEMPTION, the call Ray's own `ray start` SIGTERM handler makes)
with the deadline *now*. Ray Train's PreemptionWatcher sees the earlier deadline at its next poll, the controller
raises `PreemptionError` at once and restarts the workers on the other nodes from the checkpoint just taken:
nothing is lost, and the restart does not wait for the provider's deadline. Every rank waits, training no more,
until Ray Train ends it.

A SIGTERM is taken as its node going away (spot reclaim, node shutdown, pod eviction), as Ray takes a SIGTERM to
`ray start`: the rank that got it drains its node. Not on the head node: a drained node exits once idle, and the
head holds the cluster, so there the attempt ends with `PreemptedError` (counted against `run.max_failures`), as
it does on a one-node local Ray. A second SIGTERM exits at once.
"""
from __future__ import annotations

import os
import signal
import threading
import time

# After the checkpoint, how long a rank waits for Ray Train to end it (Ray's watcher and controller polls, 5 s and
# 2 s by default, then its teardown) beyond the drain deadline, before it gives up and raises PreemptedError.
STAND_DOWN_MARGIN_S = 90.0
# A drain notice without a deadline: Ray Train tears the workers down 120 s after it saw the drain.
NO_DEADLINE_S = 120.0


class PreemptedError(RuntimeError):
    """Every rank saved a checkpoint at the step reached and the attempt cannot end as a preemption (SIGTERM on the
    head node, or Ray Train did not end the workers in time): the run restarts, counted against run.max_failures."""


# Signals reach a process, not a run: the flag is process state by nature. Python runs signal handlers on the main
# thread only, which in a Ray Train worker is the actor's, not the training thread; see install_sigterm_handler.
_SIGTERM = threading.Event()
_PREVIOUS_SIGTERM_HANDLER: list = []


def _on_sigterm(signum, frame) -> None:
    if _SIGTERM.is_set():  # a second SIGTERM: give up on the checkpoint, exit as the previous handler would
        signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM_HANDLER[0])
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _SIGTERM.set()


def _install_on_this_thread(*_actor) -> None:
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _PREVIOUS_SIGTERM_HANDLER[:] = [current]
        signal.signal(signal.SIGTERM, _on_sigterm)


def install_sigterm_handler() -> None:
    """Make SIGTERM set the preemption flag instead of exiting (Ray's worker handler exits at once)."""
    import ray

    _SIGTERM.clear()
    if threading.current_thread() is threading.main_thread():
        _install_on_this_thread()
        return
    # Ray Train runs the training function on a thread of the worker actor; the actor's main thread is free
    # between Ray's status polls and runs this call (it also runs the handler, within a poll interval).
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.__ray_call__.remote(_install_on_this_thread))


def _this_node() -> tuple[str, bool]:
    """(node id in hex, whether it is the head node) of this process's Ray node, from the GCS."""
    import ray
    from ray._raylet import NodeID
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    node_id = ray.get_runtime_context().get_node_id()
    gcs = ray._private.worker.global_worker.gcs_client
    selector = GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(node_id).binary())
    infos = gcs.get_all_node_info(timeout=30, node_selectors=[selector]).values()
    return node_id, any(info.is_head_node for info in infos)


def drain_this_node(message: str, deadline_ms: int) -> None:
    """Ray's DrainNode for this process's node, reason PREEMPTION (not rejectable; a later call replaces the
    deadline). Raises RuntimeError if the GCS does not accept it."""
    import ray
    from ray.core.generated import autoscaler_pb2

    node_id = ray.get_runtime_context().get_node_id()
    gcs = ray._private.worker.global_worker.gcs_client
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION, message,
                                   deadline_ms, timeout=30)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


class Preemption:
    """The loop's view of preemption: `flags()` -> (sigterm, drain) of this rank, read at each synchronisation;
    `stand_down(...)` after the checkpoint. Tests pass their own object with these methods."""

    def __init__(self) -> None:
        self.notice = None  # the PreemptionInfo of the drain notice, once Ray Train has reported one

    def flags(self) -> tuple[bool, bool]:
        import ray.train

        if self.notice is None:  # a barrier on every rank: the loop calls flags() at the same steps everywhere
            self.notice = ray.train.get_preemption_info()
        return _SIGTERM.is_set(), self.notice is not None

    def deadline_s(self) -> float:
        """When Ray Train tears the workers down (time.time()): the notice's deadline, else now."""
        if self.notice is None:
            return time.time()
        if self.notice.deadline_ms is None:
            return time.time() + NO_DEADLINE_S
        return self.notice.deadline_ms / 1000

    def stand_down(self, step: int) -> None:
        """Every rank, after the checkpoint of `step`: end this attempt as a preemption (module docstring).

        Never returns: Ray Train ends the process, or PreemptedError is raised."""
        import ray.train
        import torch.distributed as dist

        if dist.is_initialized():  # every rank's upload is done: Ray's SYNC report has no barrier after the upload,
            dist.barrier()         # and a rank that drains its node now would cut off another's upload
        rank = ray.train.get_context().get_world_rank()
        _, is_head = _this_node()
        sigterm = _SIGTERM.is_set()
        deadline_s = self.deadline_s()
        if (sigterm or (self.notice is not None and rank in self.notice.preempted_ranks)) and not is_head:
            why = "SIGTERM" if sigterm else "drain notice"
            drain_this_node(f"rank {rank}: {why}; checkpoint of step {step} taken, node released",
                            int(time.time() * 1000))
            deadline_s = time.time()
        elif sigterm:
            raise PreemptedError(f"SIGTERM on the head node: saved a checkpoint at step {step}; stopping so the run "
                                 f"restarts from it (the head is not drained: it holds the cluster)")
        wait_for_teardown(deadline_s + STAND_DOWN_MARGIN_S, step)


def wait_for_teardown(until_s: float, step: int) -> None:
    """Train no more; Ray Train ends this worker. Past `until_s` (time.time()), raise PreemptedError."""
    while time.time() < until_s:
        time.sleep(0.5)
    raise PreemptedError(f"Ray Train did not end this attempt after the preemption checkpoint of step {step}; "
                         f"stopping so the run restarts from it")


class NoPreemption:
    """For running the loop's phases outside Ray."""

    def flags(self) -> tuple[bool, bool]:
        return False, False

    def stand_down(self, step: int) -> None:
        raise AssertionError("no preemption outside Ray")
