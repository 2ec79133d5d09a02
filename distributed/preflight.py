"""Checks before any worker starts, so a bad setting fails in seconds with a clear message, not after an hour.

Storage (reachable, bucket present, writable), a resumed run's settings (those its checkpoints depend on, and the
training order its data position belongs to),
data (index readable, splits present, class count matching the model), resources (GPUs and CPUs a local Ray
can give) and the DeepSpeed config (validated offline with DeepSpeed's own `DeepSpeedConfig`, plus a check
that it reads every top-level key).
"""
from __future__ import annotations

import uuid

import yaml

from data import read_index, train_fingerprint
from distributed import checkpoint as ckpt
from distributed.config import Config, ConfigError, worker_range
from distributed.loop import stream_options
from distributed.resume import check_resumable
from distributed.run_folder import RunFolder, join


class PreflightError(RuntimeError):
    """The run cannot start; the message says what to fix."""


def check_storage(run_uri: str) -> None:
    """The bucket must exist and the run folder be writable: write, read back and delete a probe file."""
    run = RunFolder(run_uri, attempts=1)  # fail fast: the client's own retries are enough for a probe
    name = f".preflight-{uuid.uuid4().hex[:8]}"
    try:
        if not run._local:
            bucket = run.path.split("/", 1)[0]
            # fsspec's makedirs would create a missing bucket (s3fs does): a typo must not make a new bucket.
            # info(), not exists(): exists() says False for an unreachable endpoint too.
            try:
                run.fs.info(bucket)
            except FileNotFoundError:
                raise PreflightError(f"storage {run_uri}: bucket '{bucket}' does not exist (or these credentials "
                                     "cannot see it); create it or fix run.storage_path") from None
        run.write_text(name, "ok")
        if run.read_text(name) != "ok":
            raise PreflightError(f"storage {run_uri}: a probe file read back differently")
        run.fs.rm(f"{run.path}/{name}")
    except PreflightError:
        raise
    except Exception as e:  # noqa: BLE001 -- any storage failure is reported with its URL
        raise PreflightError(f"storage {run_uri} is not reachable or not writable ({type(e).__name__}: {e}); "
                             "check run.storage_path, the endpoint, the bucket name and credentials") from e


def _setting(tree: dict, dotted: str):
    section, key = dotted.split(".")
    return tree.get(section, {}).get(key)


def check_resume_settings(cfg: Config, run_uri: str) -> None:
    """A run with checkpoints resumes from them: the settings their state depends on must not change.

    Compared with the run folder's config.yaml, which the previous launch wrote (this one writes it later).
    """
    run = RunFolder(run_uri, attempts=1)
    if not run.exists("config.yaml") or not run.fs.glob(f"{run.path}/checkpoint_*"):
        return
    saved = yaml.safe_load(run.read_text("config.yaml")) or {}
    keys = ["model.name", "model.kwargs", "optim.name", "strategy.name", "strategy.zero_stage"]
    if cfg.strategy.name == "deepspeed":
        keys.append("run.num_workers")  # ZeRO shards are per rank (another world size needs universal checkpoints)
    now = cfg.to_dict()
    changed = [f"{k}: {_setting(saved, k)!r} -> {_setting(now, k)!r}" for k in keys
               if _setting(saved, k) != _setting(now, k)]
    if changed:
        raise PreflightError(f"run {run_uri} has checkpoints written with other settings ({'; '.join(changed)}); "
                             "resume it with its own settings, or start a new run.name")


def check_resume_order(cfg: Config, run_uri: str) -> None:
    """The checkpoint a launch would continue from (the run's newest, else resume_from) must hold a global sample
    position and the training order of this config (seed, index, global batch, shuffle budget): read from its
    meta.json, so a refusal comes before any worker starts (the worker checks the state it loads again)."""
    names = ckpt.list_checkpoints(run_uri)
    url = join(run_uri, names[0]) if names else cfg.resume_from
    if not url:
        return
    meta = ckpt.read_meta(url) or {}
    try:
        check_resumable(meta, train_fingerprint(stream_options(cfg)), url)
    except ckpt.CheckpointError as e:
        raise PreflightError(str(e)) from None


def check_model(cfg: Config, num_classes: int) -> None:
    """Build the model on the meta device (no memory, no compute): a bad name or argument fails here."""
    import torch

    from distributed.model import build_model

    with torch.device("meta"):
        build_model(cfg, num_classes)


def check_data(cfg: Config) -> int:
    """The index must be readable with non-empty train and val splits; returns its number of classes."""
    index = read_index(cfg.data.url)  # ShardIndexError names the URL and what is wrong
    for split in ("train", "val"):
        if split not in index.splits or index.splits[split].samples == 0:
            raise PreflightError(f"data index {cfg.data.url}: split '{split}' is missing or empty; "
                                 "run `python -m jobs.prepare` with that split")
    train = index.splits["train"].samples
    if train < cfg.data.global_batch_size:
        raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} is larger than the {train} training "
                          f"samples of {cfg.data.url}: an epoch would have no step")
    return len(index.classes)


def check_resources(cfg: Config, local: bool) -> None:
    """A local Ray cannot grow: asking it for more GPUs or CPUs than it has would wait forever."""
    import ray

    have = ray.cluster_resources()
    gpus = have.get("GPU", 0)
    least = worker_range(cfg.run)[0]  # an elastic run starts with its minimum
    if cfg.run.use_gpu and local and gpus < least:
        raise PreflightError(f"run.use_gpu=true with run.num_workers={cfg.run.num_workers}, but this Ray has "
                             f"{gpus:g} GPUs; set run.use_gpu=false or run on a GPU cluster")
    if cfg.run.use_gpu and gpus == 0:
        print(f"note: the cluster has no GPU yet; waiting for the autoscaler to add {least}", flush=True)
    cpus = least * cfg.run.cpus_per_worker
    if local and have.get("CPU", 0) < cpus:
        raise PreflightError(f"run.num_workers={cfg.run.num_workers} x run.cpus_per_worker={cfg.run.cpus_per_worker:g}"
                             f" needs {cpus:g} CPUs, but this Ray has {have.get('CPU', 0):g}; lower them")


class _ReadTracking(dict):
    """A dict that records which keys were looked up (DeepSpeed reads its config with get/[]/in)."""

    def __init__(self, *args, seen: set | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = set() if seen is None else seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def __copy__(self):
        return _ReadTracking(self, seen=self.seen)


def check_deepspeed(cfg: Config) -> None:
    """Validate the generated DeepSpeed config offline, as DeepSpeed would at `deepspeed.initialize`.

    DeepSpeedConfig runs without a process group (it then assumes world size 1), so train_batch_size is
    divided by the world size first; its checks then equal those on the cluster. Top-level keys it never
    reads are rejected too: DeepSpeed would ignore a misspelt key silently.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    from distributed.strategies import deepspeed_config

    ds = deepspeed_config(cfg)
    offline = dict(ds)
    if "train_batch_size" in ds:  # config.validate_deepspeed_section: equal to the global batch
        offline["train_batch_size"] = ds["train_batch_size"] // cfg.run.num_workers
    tracked = _ReadTracking(offline)
    try:
        DeepSpeedConfig(tracked)
    except Exception as e:  # noqa: BLE001 -- DeepSpeed raises AssertionError, ValueError, pydantic errors...
        raise ConfigError(f"DeepSpeed rejects the config built from strategy.* ({type(e).__name__}: {e}); "
                          "see https://www.deepspeed.ai/docs/config-json/") from e
    unread = sorted(set(ds) - tracked.seen)
    if unread:
        raise ConfigError(f"strategy.deepspeed: DeepSpeed does not know the top-level key(s) {', '.join(unread)} "
                          "(it would ignore them); see https://www.deepspeed.ai/docs/config-json/")


def preflight(cfg: Config, run_uri: str, local: bool = True) -> None:
    check_storage(run_uri)
    check_resume_settings(cfg, run_uri)
    num_classes = check_data(cfg)
    check_resume_order(cfg, run_uri)
    check_model(cfg, num_classes)
    check_resources(cfg, local)
    if cfg.strategy.name == "deepspeed":
        check_deepspeed(cfg)  # imports deepspeed: a broken install fails here, not in every worker
