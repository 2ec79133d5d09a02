"""Checks before any worker starts, so a bad setting fails in seconds with a clear message, not after an hour."""
from __future__ import annotations

import uuid

from data import read_index
from distributed.config import Config, ConfigError
from distributed.run_folder import RunFolder


class PreflightError(RuntimeError):
    """The run cannot start; the message says what to fix."""


def check_storage(run_uri: str) -> None:
    """The run folder must be writable: write, read back and delete a probe file."""
    run = RunFolder(run_uri)
    name = f".preflight-{uuid.uuid4().hex[:8]}"
    try:
        run.write_text(name, "ok")
        if run.read_text(name) != "ok":
            raise PreflightError(f"storage {run_uri}: a probe file read back differently")
        run.fs.rm(f"{run.path}/{name}")
    except PreflightError:
        raise
    except Exception as e:  # noqa: BLE001 -- any storage failure is reported with its URL
        raise PreflightError(f"storage {run_uri} is not writable ({type(e).__name__}: {e}); "
                             "check run.storage_path, the bucket name and credentials") from e


def check_data(cfg: Config) -> None:
    index = read_index(cfg.data.url)
    for split in ("train", "val"):
        if split not in index.splits or index.splits[split].samples == 0:
            raise PreflightError(f"data index {cfg.data.url}: split '{split}' is missing or empty; "
                                 "run `python -m jobs.prepare` with that split")
    per_rank = index.splits["train"].samples // cfg.run.num_workers
    if per_rank < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the {per_rank} training samples "
                          f"each of the {cfg.run.num_workers} workers gets from {cfg.data.url}")


def check_resources(cfg: Config, local: bool) -> None:
    import ray

    if not cfg.run.use_gpu:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if local and gpus < cfg.run.num_workers:
        raise PreflightError(f"run.use_gpu=true with run.num_workers={cfg.run.num_workers}, but this Ray has "
                             f"{gpus:g} GPUs; set run.use_gpu=false or run on a GPU cluster")
    if gpus == 0:
        print(f"note: the cluster has no GPU yet; waiting for the autoscaler to add {cfg.run.num_workers}", flush=True)


def preflight(cfg: Config, run_uri: str, local: bool = True) -> None:
    check_storage(run_uri)
    check_data(cfg)
    check_resources(cfg, local)
    if cfg.strategy.name == "deepspeed":
        import deepspeed  # noqa: F401 -- a broken install fails here, not in every worker
