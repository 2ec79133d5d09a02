"""Fail fast, before any training step, with a message that says what to fix (distributed/preflight.py).

Only the last test goes through `fit`, to show the checks run before any worker starts; the others call the
checks directly (the resource checks ask the session's local Ray, which has 2 CPUs and no GPU).
"""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import s3fs

from data.index import ShardIndexError
from distributed.config import ConfigError, load_config
from distributed.model import model_kwargs
from distributed.preflight import (PreflightError, check_data, check_deepspeed, check_model, check_resources,
                                   check_resume_settings, check_storage)
from distributed.run_folder import RunFolder


def test_local_storage_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PreflightError, match=f"storage {blocker}/runs/x is not reachable or not writable"):
        check_storage(f"{blocker}/runs/x")
    check_storage(str(tmp_path / "runs" / "x"))  # a fresh local folder is fine
    assert os.listdir(tmp_path / "runs" / "x") == []  # and the probe file is gone


def test_missing_bucket_fails_and_is_not_created(s3_server):
    fs = s3fs.S3FileSystem()
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PreflightError, match=f"bucket '{bucket}' does not exist"):
        check_storage(f"s3://{bucket}/runs/x")
    fs.invalidate_cache()
    assert not fs.exists(bucket)


@pytest.mark.slow
def test_unreachable_storage_fails_in_seconds(s3_bucket, s3_server, monkeypatch):
    dead = s3_server.endpoint.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    s3fs.S3FileSystem.clear_instance_cache()
    start = time.monotonic()
    with pytest.raises(PreflightError, match="is not reachable or not writable.*check run.storage_path, the endpoint"):
        check_storage(f"s3://{s3_bucket}/runs/x")
    assert time.monotonic() - start < 30  # the client's own retries only, not the run folder's backoff
    s3fs.S3FileSystem.clear_instance_cache()


def test_writable_bucket_passes(s3_bucket):
    check_storage(f"s3://{s3_bucket}/runs/x")
    assert not s3fs.S3FileSystem().find(f"{s3_bucket}/runs")  # the probe is removed


def test_missing_and_malformed_data_index(tmp_path, shards, tiny_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardIndexError, match=rf"{empty}/_index.json: not found; run `python -m jobs.prepare"):
        check_data(tiny_config(str(empty), str(tmp_path), "x"))
    (empty / "_index.json").write_text("{not json")
    with pytest.raises(ShardIndexError, match="_index.json: not valid JSON"):
        check_data(tiny_config(str(empty), str(tmp_path), "x"))
    index = json.loads(open(os.path.join(shards, "_index.json")).read())
    del index["splits"]["val"]
    (empty / "_index.json").write_text(json.dumps(index))
    with pytest.raises(PreflightError, match="split 'val' is missing or empty"):
        check_data(tiny_config(str(empty), str(tmp_path), "x"))
    assert check_data(tiny_config(shards, str(tmp_path), "x")) == 3


def test_class_count_must_match_the_index(shards, tmp_path, tiny_config):
    wrong = tiny_config(shards, str(tmp_path), "x", "model.kwargs={se_placement: branch, num_classes: 1000}")
    with pytest.raises(ConfigError, match=r"model.kwargs.num_classes=1000 but the data index .* has 3 classes"):
        check_model(wrong, check_data(wrong))
    right = tiny_config(shards, str(tmp_path), "x", "model.kwargs={se_placement: branch, num_classes: 3}")
    check_model(right, 3)
    assert model_kwargs(right, 3, shards) == {"se_placement": "branch", "num_classes": 3}
    typo = tiny_config(shards, str(tmp_path), "x", "model.kwargs={se_placment: branch}")
    with pytest.raises(ConfigError, match="unexpected keyword argument 'se_placment'"):
        check_model(typo, 3)


@pytest.mark.slow
def test_gpus_and_cpus_a_local_ray_does_not_have(ray_local, shards, tmp_path, tiny_config):
    with pytest.raises(PreflightError, match="run.use_gpu=true with run.num_workers=2, but this Ray has 0 GPUs"):
        check_resources(tiny_config(shards, str(tmp_path), "x", "run.use_gpu=true"), local=True)
    with pytest.raises(PreflightError, match=r"needs 8 CPUs, but this Ray has 2"):
        check_resources(tiny_config(shards, str(tmp_path), "x", "run.num_workers=4", "run.cpus_per_worker=2"),
                        local=True)
    check_resources(tiny_config(shards, str(tmp_path), "x", "strategy.precision=fp16"), local=True)  # CPU autocast
    check_resources(tiny_config(shards, str(tmp_path), "x"), local=True)


@pytest.mark.parametrize("section, match", [
    ("{gradient_clippin: 1.0}", "DeepSpeed does not know the top-level key.* gradient_clippin"),
    ("{zero_optimization: {stage: 2, offload_optimizer: {device: gpu}}}", "offload_optimizer.device"),
    ("{zero_optimization: {stag: 2}}", "(?s)stag.*Extra inputs are not permitted"),
    # Refused by the config itself: precision, gradient accumulation and the batch are strategy.*/data.* settings.
    ("{fp16: {enabled: true}}", "strategy.deepspeed.fp16' is not accepted: set strategy.precision"),
    ("{train_batch_size: 24}", r"train_batch_size' = 24 must equal data.global_batch_size = 256"),
    ("{gradient_accumulation_steps: 4}", "gradient accumulation is not supported"),
    ("{scheduler: {type: WarmupLR}}", "strategy.deepspeed.scheduler' is not accepted: set schedule"),
])
def test_deepspeed_sections_deepspeed_rejects(section, match):
    with pytest.raises(ConfigError, match=match):
        check_deepspeed(load_config("configs/se_googlenet_deepspeed.yaml", [f"strategy.deepspeed={section}"]))


def test_shipped_deepspeed_configs_pass():
    for overrides in ([], ["strategy.zero_stage=3", "strategy.precision=fp32"],
                      ["strategy.deepspeed={train_batch_size: 256, gradient_accumulation_steps: 1}"]):
        check_deepspeed(load_config("configs/se_googlenet_deepspeed.yaml", overrides))


def test_resuming_with_settings_the_checkpoints_cannot_take(shards, tmp_path, tiny_config):
    from distributed.config import dump_yaml

    run_uri = str(tmp_path / "runs" / "x")
    cfg = tiny_config(shards, str(tmp_path / "runs"), "x")
    check_resume_settings(cfg, run_uri)  # no run yet
    RunFolder(run_uri).write_text("config.yaml", dump_yaml(cfg))
    check_resume_settings(tiny_config(shards, str(tmp_path / "runs"), "x", "optim.name=sgd"), run_uri)  # no ckpt
    (tmp_path / "runs" / "x" / "checkpoint_0000000002").mkdir()
    with pytest.raises(PreflightError, match=r"optim.name: 'adamw' -> 'sgd'|optim.name: 'sgd' -> 'adamw'"):
        check_resume_settings(tiny_config(shards, str(tmp_path / "runs"), "x",
                                          f"optim.name={'sgd' if cfg.optim.name != 'sgd' else 'adamw'}"), run_uri)
    check_resume_settings(tiny_config(shards, str(tmp_path / "runs"), "x", "schedule.epochs=5"), run_uri)


@pytest.mark.slow
def test_fit_fails_before_any_worker_starts(ray_local, s3_server, shards, tiny_config):
    from distributed.trainer import fit

    bucket = f"typo-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    with pytest.raises(PreflightError, match=f"bucket '{bucket}' does not exist"):
        fit(tiny_config(shards, f"s3://{bucket}/runs", "x"))
    assert time.monotonic() - start < 30  # raised by preflight, before the trainer was built


def test_a_label_outside_the_classes_names_its_sample():
    """Not preflight, but as early as it can be known: at the first batch that holds such a label."""
    import torch

    from data import ShardFormatError
    from distributed.loop import check_labels

    batch = {"label": torch.tensor([0, 2, 3, 1]), "key": ["a", "b", "c", "d"]}
    with pytest.raises(ShardFormatError, match=r"s3://x/shards: training sample 'c' has label 3, but the index has 3"):
        check_labels(batch, 3, "s3://x/shards")
    check_labels({"label": torch.tensor([0, 2]), "key": ["a", "b"]}, 3, "s3://x/shards")
    with pytest.raises(ShardFormatError, match="sample 'a' has label -1"):  # a sample without a class
        check_labels({"label": torch.tensor([-1]), "key": ["a"]}, 3, "s3://x/shards")


def test_a_resume_that_would_change_the_training_order_is_refused(shards, tmp_path, tiny_config):
    """The newest checkpoint's meta.json holds the order's fingerprint: another seed, global batch or shuffle budget
    is refused naming the setting, old and new value; a checkpoint of the old per-rank position format too."""
    from data import train_fingerprint
    from distributed import checkpoint as ckpt
    from distributed.loop import stream_options
    from distributed.preflight import check_resume_order

    run_uri = str(tmp_path / "runs" / "x")
    cfg = tiny_config(shards, str(tmp_path / "runs"), "x")
    check_resume_order(cfg, run_uri)  # no checkpoint: nothing to compare
    directory = tmp_path / "runs" / "x" / "checkpoint_0000000002"
    ckpt.write_meta(directory, role="recovery", step=2, epoch=0, samples=32, score=None, metric="val_top1",
                    order=train_fingerprint(stream_options(cfg)))
    check_resume_order(cfg, run_uri)
    check_resume_order(tiny_config(shards, str(tmp_path / "runs"), "x", "run.num_workers=1",
                                   "data.loader_workers=2"), run_uri)  # the shape may change
    for override, message in (("run.seed=1", "seed: 0 -> 1"), ("data.global_batch_size=8", "global_batch_size: 16 -> 8"),
                              ("data.shuffle_buffer_mb=1", "shuffle_buffer_mb: 64.0 -> 1.0")):
        with pytest.raises(PreflightError, match=f"checkpoint_0000000002: the training order would change .*{message}"):
            check_resume_order(tiny_config(shards, str(tmp_path / "runs"), "x", override), run_uri)
    (directory / "meta.json").write_text('{"format_version": 1, "role": "recovery", "step": 2, "epoch": 0, '
                                         '"batch": 2, "score": null, "metric": "val_top1"}')
    with pytest.raises(PreflightError, match="written by an older version: its data position is .* Start a new run.name"):
        check_resume_order(cfg, run_uri)
