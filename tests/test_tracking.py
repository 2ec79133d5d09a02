"""tracking.backend=mlflow: params, per-step and per-epoch metrics, the summary and the curves in an MLflow file
store, read back through MLflow's client; one MLflow run across a stopped and resumed training run."""
from __future__ import annotations

import json

import pytest

from distributed.config import ConfigError, load_config
from distributed.metrics import MetricsLog
from distributed.run_folder import RunFolder
from distributed.tracking import TRACKING_FILE, flat_params, metrics_log, mlflow_uri, open_run, tracked_run

mlflow = pytest.importorskip("mlflow")  # the `tracking` extra (in `dev` too)


def _cfg(tmp_path, *extra):
    return load_config("configs/demo.yaml", [f"run.storage_path={tmp_path / 'runs'}", "run.name=tracked",
                                             "tracking.backend=mlflow", f"tracking.uri={tmp_path / 'mlruns'}",
                                             "tracking.experiment=tests", *extra])


def _client(cfg):
    return mlflow.MlflowClient(mlflow_uri(cfg.tracking))


def test_config_section_is_checked():
    assert load_config(None).tracking.backend == "none"
    with pytest.raises(ConfigError, match="'none', 'mlflow'"):
        load_config(None, ["tracking.backend=wandb"])
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config(None, ["tracking.urll=x"])


def test_uri_is_resolved_once_and_never_holds_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tracking.backend=mlflow", "tracking.uri=mlruns"])
    assert mlflow_uri(cfg.tracking) == f"file://{tmp_path}/mlruns"  # absolute: workers run elsewhere
    served = load_config(None, ["tracking.uri=http://127.0.0.1:5000"])
    assert mlflow_uri(served.tracking) == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        mlflow_uri(load_config(None, ["tracking.uri=https://me:secret@mlflow.example"]).tracking)


def test_params_are_the_flat_config_without_the_tracking_section(tmp_path):
    params = flat_params(_cfg(tmp_path, "model.kwargs={se_placement: module}").to_dict())
    assert params["model.name"] == "se_googlenet" and params["data.global_batch_size"] == "32"
    assert json.loads(params["model.kwargs"]) == {"se_placement": "module"}
    assert json.loads(params["data.crop_scale"]) == [0.35, 1.0]  # configs/demo.yaml
    assert not any(k.startswith("tracking.") for k in params)


def test_run_is_opened_once_and_resumed_from_the_run_folder(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunFolder(str(tmp_path / "runs/tracked"))
    with tracked_run(cfg) as first:
        pass
    saved = json.loads(run.read_text(TRACKING_FILE))
    assert saved["run_id"] == first.tracker.run_id and saved["uri"] == mlflow_uri(cfg.tracking)
    metrics = metrics_log(cfg, run, attempt=0, resume_step=0)  # rank 0's log, attached to that run
    metrics.log({"kind": "train", "epoch": 0, "step": 2, "loss": 1.5, "lr": 0.1, "images_per_s": 10.0, "time": 1.0})
    metrics.close()
    again = open_run(_cfg(tmp_path, "run.stop_after_steps=5"), run)  # a changed setting does not fail the resume
    assert again.run_id == first.tracker.run_id
    client = _client(cfg)
    assert [r.info.run_id for r in client.search_runs([saved["experiment_id"]])] == [saved["run_id"]]
    got = client.get_run(saved["run_id"])
    assert got.info.status == "RUNNING" and got.data.params["model.name"] == "se_googlenet"
    assert "run.stop_after_steps" in got.data.params and got.data.params["run.stop_after_steps"] == "null"
    assert [(m.step, m.value) for m in client.get_metric_history(saved["run_id"], "train/loss")] == [(2, 1.5)]


def test_failed_training_marks_the_run_failed(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(cfg) as tracking:
            raise RuntimeError("boom")
    assert _client(cfg).get_run(tracking.tracker.run_id).info.status == "FAILED"


def test_workers_refuse_to_track_without_the_drivers_run(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="jobs.train"):
        metrics_log(cfg, RunFolder(str(tmp_path / "runs/tracked")), attempt=0, resume_step=0)
    untracked = metrics_log(_cfg(tmp_path, "tracking.backend=none"), RunFolder(str(tmp_path / "runs/plain")), 0, 0)
    assert type(untracked) is MetricsLog  # without tracking, rank 0 keeps the plain log
    untracked.close()


@pytest.mark.long
@pytest.mark.slow
def test_stopped_and_resumed_training_logs_one_mlflow_run(ray_local, shards, tmp_path):
    from tests.conftest import tiny_overrides

    from jobs import train as train_job

    overrides = tiny_overrides(shards, str(tmp_path / "runs"), "tracked", "tracking.backend=mlflow",
                               f"tracking.uri={tmp_path / 'mlruns'}", "tracking.experiment=tests")
    argv = ["--config", "configs/demo.yaml", *[a for o in overrides for a in ("--set", o)]]
    assert train_job.main([*argv, "--set", "run.stop_after_steps=5"]) == 0
    run = RunFolder(str(tmp_path / "runs/tracked"))
    saved = json.loads(run.read_text(TRACKING_FILE))
    client = mlflow.MlflowClient(saved["uri"])
    assert client.get_run(saved["run_id"]).info.status == "KILLED"  # stopped before its last epoch
    assert train_job.main(argv) == 0  # the same run name: resumes at step 5, and the same MLflow run
    assert json.loads(run.read_text(TRACKING_FILE))["run_id"] == saved["run_id"]
    assert len(client.search_runs([saved["experiment_id"]])) == 1
    got = client.get_run(saved["run_id"])
    assert got.info.status == "FINISHED"
    assert got.data.params["model.name"] == "se_googlenet" and got.data.params["data.global_batch_size"] == "16"
    records = run.read_jsonl("metrics.jsonl")
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(m.step, m.value) for m in client.get_metric_history(saved["run_id"], "train/loss")] == \
        [(r["step"], r["loss"]) for r in trains]
    assert [(m.step, m.value) for m in client.get_metric_history(saved["run_id"], "eval/val_top1")] == \
        [(r["step"], r["val_top1"]) for r in evals] and len(evals) == 2
    summary = json.loads(run.read_text("summary.json"))
    assert got.data.metrics["summary/best_top1"] == summary["best_top1"] and summary["steps"] == 8
    artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
    assert {"summary.json", "curves.png"} <= artifacts
    assert client.download_artifacts(saved["run_id"], "summary.json", str(tmp_path)) and \
        json.loads((tmp_path / "summary.json").read_text()) == summary
