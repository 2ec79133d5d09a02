"""The driver side: build Ray Train's TorchTrainer from a Config, run it, and write summary.json."""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid

from data import read_index
from distributed import checkpoint as ckpt
from distributed.cluster import init_ray
from distributed.config import Config, dump_yaml, worker_range
from distributed.metrics import read_metrics, write_metrics_jsonl
from distributed.reporting import SCORE, score_metric
from distributed.run_folder import RunFolder, join, storage_filesystem, storage_uri
from distributed.worker import train_loop_per_worker


def scaling_workers(cfg: Config) -> int | tuple[int, int]:
    """run.num_workers as Ray Train 2.60's ScalingConfig takes it: a count, or (min, max) for elastic training."""
    lo, hi = worker_range(cfg.run)
    return lo if lo == hi else (lo, hi)


def build_trainer(cfg: Config, run_uri: str, launch_id: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # s3://: a pyarrow S3 client that retries with backoff through storage outages (run_folder.storage_filesystem).
    filesystem, storage_path = storage_filesystem(storage_uri(cfg.run.storage_path))
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_uri": run_uri, "launch_id": launch_id},
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        # A range (min, max) is Ray Train's elastic scaling: it starts the worker group with as many ranks as the
        # cluster can place and restarts it from the latest checkpoint when that number changes
        # (docs/fault_tolerance.md, "Elastic runs"); the loop then continues the epoch at the new size.
        scaling_config=ScalingConfig(num_workers=scaling_workers(cfg), use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cfg.run.elastic_resize_interval_s),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # Keep the num_to_keep best evaluated checkpoints by score; recovery checkpoints score -1, and Ray
            # always keeps the latest too, so resume never goes back (distributed/reporting.py).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep,
                                               checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # Ray Train tees worker prints into its logger too; without this each progress line shows twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def fit(cfg: Config) -> dict:
    """Run (or resume) the training run named cfg.run.name; return the summary that is also saved."""
    from distributed.preflight import preflight

    where = init_ray(cfg.run.address)
    # Workers do not run in the driver's directory: hand them absolute local paths.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, url=storage_uri(cfg.data.url)))
    run_uri = join(storage_uri(cfg.run.storage_path), cfg.run.name)
    preflight(cfg, run_uri, local=where == "local")
    run = RunFolder(run_uri)
    run.write_text("config.yaml", dump_yaml(cfg))
    launch_id = uuid.uuid4().hex
    lo, hi = worker_range(cfg.run)
    print(f"run {cfg.run.name}: {cfg.model.name}, {cfg.strategy.name}, {lo if lo == hi else f'{lo}-{hi}'} workers, "
          f"global batch {cfg.data.global_batch_size} ({where} Ray), run folder {run_uri}", flush=True)
    start = time.time()
    result = build_trainer(cfg, run_uri, launch_id).fit()
    summary = build_summary(cfg, run, result, launch_id, time.time() - start)
    write_metrics_jsonl(run)
    run.write_text("summary.json", json.dumps(summary, indent=2))
    return summary


def run_shapes(attempts: list[dict]) -> list[dict]:
    """Each shape the run had, in order, over every launch: ranks, per-rank batch and loader workers from the step
    an attempt started at (consecutive attempts of one shape are one entry)."""
    shapes: list[dict] = []
    for a in attempts:
        world, g = a.get("world_size"), a.get("global_batch_size")
        shape = {"world_size": world, "per_rank_batch": g // world if g and world else None,
                 "loader_workers": a.get("loader_workers")}
        if not shapes or {k: shapes[-1][k] for k in shape} != shape:
            shapes.append({**shape, "from_step": a["restored_step"]})
    return shapes


def summarize_attempts(run: RunFolder, launch_id: str) -> dict:
    every = run.read_jsonl("attempts.jsonl")
    attempts = [a for a in every if a["launch_id"] == launch_id]
    return {"failures_survived": max(0, len(attempts) - 1),
            "params": attempts[-1]["params"] if attempts else None,
            "started_from": attempts[0]["restored_from"] if attempts else None,
            "world_size": attempts[-1]["world_size"] if attempts else None,
            "shapes": run_shapes(every)}


def best_checkpoint(run: RunFolder) -> dict:
    """The evaluated checkpoint with the highest score among those on storage (Ray has retired the others)."""
    names = ckpt.list_checkpoints(run.uri)
    best = ckpt.best_evaluated(run.uri, names)
    if best is None:
        return {"best_checkpoint": None, "best_score": None}
    return {"best_checkpoint": join(run.uri, best[0]), "best_score": best[1]["score"]}


def _eval_figures(evals: list[dict]) -> dict:
    best = max(evals, key=lambda r: r["val_top1"], default=None)
    final = evals[-1] if evals else None
    out = {"best_top1": best["val_top1"] if best else None, "best_top5": best["val_top5"] if best else None,
           "final_top1": final["val_top1"] if final else None, "final_top5": final["val_top5"] if final else None}
    if any("val_ema_top1" in r for r in evals):
        ema_best = max(evals, key=lambda r: r["val_ema_top1"])
        out.update(best_ema_top1=ema_best["val_ema_top1"], best_ema_top5=ema_best["val_ema_top5"],
                   final_ema_top1=final["val_ema_top1"], final_ema_top5=final["val_ema_top5"])
    return out


def build_summary(cfg: Config, run: RunFolder, result, launch_id: str, wall: float) -> dict:
    records = read_metrics(run)
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    final = evals[-1] if evals else None
    checkpoint = join(run.uri, os.path.basename(result.checkpoint.path.rstrip("/"))) if result.checkpoint else None
    return {
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "precision": cfg.strategy.precision,
        "global_batch_size": cfg.data.global_batch_size,
        **summarize_attempts(run, launch_id),  # world_size: the last attempt's; shapes: every one the run had
        "epochs": final["epoch"] if final else 0,
        "steps": final["step"] if final else 0,
        **_eval_figures(evals),
        "wall_time_s": round(wall, 1),
        "images_per_s": round(sum(r["images_per_s"] for r in trains) / len(trains), 2) if trains else None,
        "checkpoint": checkpoint,
        "score_metric": score_metric(cfg),
        **best_checkpoint(run),
        "corrupt_images_skipped": (final["corrupt_val"] + final.get("corrupt_train", 0)) if final else 0,
        # Undecodable files found by jobs.prepare: listed in _meta/bad_files.json beside the shards, never in them.
        "bad_files_excluded_by_prepare": read_index(cfg.data.url).bad_files,
        "run_uri": run.uri,
    }
