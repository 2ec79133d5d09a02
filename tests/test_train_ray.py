"""End-to-end training on a local Ray (127.0.0.1) with 2 CPU workers: DDP on S3, DeepSpeed ZeRO-2, exact
resume, a SIGKILLed worker. Small images and few steps; each run takes 20-40 s on 2 cores."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import fsspec
import psutil
import pytest
import torch

from distributed import checkpoint as ckpt
from distributed.run_folder import RunFolder
from distributed.trainer import fit
from evaluation.report import write_curves

pytestmark = pytest.mark.slow


def load_final_state(run_uri: str, summary: dict, tmp_path) -> dict:
    fs, path = fsspec.core.url_to_fs(summary["checkpoint"])
    local = tmp_path / f"ckpt-{uuid.uuid4().hex[:6]}"
    fs.get(path, str(local), recursive=True)
    return ckpt.load_state(local)  # verifies the manifest first


def test_ddp_run_with_data_and_checkpoints_on_s3(ray_local, tiny_config, shards, s3_bucket, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.put(shards, f"{s3_bucket}/shards", recursive=True)
    cfg = tiny_config(f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/runs", "ddp-s3")
    summary = fit(cfg)
    write_curves(summary["run_uri"])  # as jobs.train does after fit
    assert summary["epochs"] == 2 and summary["steps"] == 8 and summary["failures_survived"] == 0
    assert summary["world_size"] == 2 and summary["params"] > 6_000_000
    assert 0.0 <= summary["final_top1"] <= summary["final_top5"] <= 1.0
    assert summary["checkpoint"] == f"s3://{s3_bucket}/runs/ddp-s3/checkpoint_0000000008"
    run = RunFolder(f"s3://{s3_bucket}/runs/ddp-s3")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "attempts.jsonl"):
        assert run.exists(name), name
    assert json.loads(run.read_text("summary.json")) == summary
    assert fs.glob(f"{s3_bucket}/runs/ddp-s3/tensorboard/events.out.tfevents.*")
    evals = [r for r in run.read_jsonl("metrics.jsonl") if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and all(r["val_samples"] == 24 for r in evals)
    state = load_final_state(run.uri, summary, tmp_path)
    assert state["config"] == cfg.to_dict() and state["step"] == 8 and state["epoch"] == 2
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "batch", "best_top1"}


def test_deepspeed_zero2_bf16_run(ray_local, tiny_config, shards, tmp_path):
    cfg = tiny_config(shards, str(tmp_path / "runs"), "zero2", "strategy.name=deepspeed", "strategy.zero_stage=2",
                 "strategy.precision=bf16", "schedule.epochs=1")
    summary = fit(cfg)
    assert summary["steps"] == 4 and summary["strategy"] == "deepspeed"
    directory = tmp_path / "runs" / "zero2" / "checkpoint_0000000004"
    manifest = ckpt.verify_checkpoint(directory)
    assert manifest["writers"] == 2  # both ranks wrote their ZeRO shard and manifest
    assert sorted(p.name for p in (directory / "zero").glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_interrupted_and_resumed_run_equals_uninterrupted(ray_local, tiny_config, shards, tmp_path):
    storage = str(tmp_path / "runs")
    det = ["run.deterministic=true"]
    full = fit(tiny_config(shards, storage, "full", *det, "run.num_to_keep=10"))
    # First launch stops at step 5 (mid-epoch 2, after its checkpoint); the second launch of the same name resumes.
    stopped = fit(tiny_config(shards, storage, "cut", *det, "run.stop_after_steps=5"))
    assert stopped["steps"] == 4  # last completed evaluation; training itself reached step 5
    resumed = fit(tiny_config(shards, storage, "cut", *det))
    assert resumed["started_from"].startswith("run:checkpoint_0000000005")
    assert resumed["steps"] == 8 and resumed["failures_survived"] == 0
    a, b = load_final_state("", full, tmp_path), load_final_state("", resumed, tmp_path)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["final_top1"] == full["final_top1"]
    # resume_from starts a new run from another run's checkpoint: same position, same end.
    forked = fit(tiny_config(shards, storage, "fork", *det,
                        f"resume_from={os.path.join(storage, 'full', 'checkpoint_0000000004')}"))
    assert forked["started_from"].startswith("resume_from=") and forked["steps"] == 8
    c = load_final_state("", forked, tmp_path)
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    # A finished run resubmitted under its name finishes at once instead of starting over.
    again = fit(tiny_config(shards, storage, "cut", *det))
    assert again["steps"] == 8 and again["started_from"].startswith("run:checkpoint_0000000008")


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def test_worker_sigkilled_mid_epoch_twice_and_run_finishes(ray_local, tiny_config, shards, tmp_path):
    storage = str(tmp_path / "runs")
    run = RunFolder(os.path.join(storage, "killed"))
    kills = []

    def killer():
        for target_step in (3, 6):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                steps = [r["step"] for r in run.read_jsonl("metrics.jsonl") if r["kind"] == "train"] \
                    if run.fs.exists(run.path) else []
                workers = _train_workers()
                if steps and max(steps) >= target_step and len(workers) == 2:
                    workers[-1].send_signal(signal.SIGKILL)
                    kills.append(max(steps))
                    break
                time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = fit(tiny_config(shards, storage, "killed", "run.max_failures=3", "run.log_every_steps=1",
                         "schedule.epochs=3"))
    thread.join(timeout=5)
    assert len(kills) == 2, kills
    assert summary["failures_survived"] == 2 and summary["steps"] == 12 and summary["epochs"] == 3
    attempts = run.read_jsonl("attempts.jsonl")
    # Each restart resumed from a checkpoint at most one interval (2 steps) before the kill.
    for kill_step, attempt in zip(kills, attempts[1:]):
        assert kill_step - attempt["restored_step"] <= 2 + 1, (kills, attempts)
