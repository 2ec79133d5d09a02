"""Preemption: SIGTERM to a worker (spot reclaim, node shutdown, pod eviction) and Ray node drains.

SIGTERM sets a flag; Ray's drain notice (`ray.train.get_preemption_info()`) is another. The loop reads both at
its next synchronisation (`monitor.StepStats.sync`, every `run.log_every_steps` steps), where they are summed
across ranks, so every rank takes the same decision at the same step: on SIGTERM all report a checkpoint and
raise `PreemptedError` (Ray Train restarts the workers from it); on a drain one checkpoint is taken and training
goes on. A second SIGTERM exits at once.
"""
from __future__ import annotations

import os
import signal
import threading


class PreemptedError(RuntimeError):
    """A worker got SIGTERM: every rank saved a checkpoint at the step reached and stops, so the run restarts."""


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


class Preemption:
    """The loop's view of preemption: `flags()` -> (sigterm, drain) of this rank, read at each synchronisation.

    The drain is reported once (one checkpoint per drain notice). Tests pass their own object with `flags()`.
    """

    def __init__(self) -> None:
        self.drain_seen = False

    def flags(self) -> tuple[bool, bool]:
        import ray.train

        drain = not self.drain_seen and ray.train.get_preemption_info() is not None
        return _SIGTERM.is_set(), drain

    def drained(self) -> None:
        """The drain checkpoint was taken (every rank calls this after the synced decision)."""
        self.drain_seen = True


class NoPreemption:
    """For running the loop's phases outside Ray."""

    def flags(self) -> tuple[bool, bool]:
        return False, False

    def drained(self) -> None:
        pass
