"""Experiment tracking in MLflow, beside the run folder (`tracking.backend: mlflow`, the `tracking` extra).

The driver opens the MLflow run before any worker starts (`tracked_run`: a bad URI or a missing package fails
in seconds) and keeps its id in the run folder's `tracking.json`, so a restarted worker group or a resubmitted
run logs into the same MLflow run. Rank 0 sends every metrics.jsonl record as it is logged (`TrackedMetricsLog`:
train records per `run.log_every_steps`, eval records per epoch, checkpoint timings; named `kind/key` as in
TensorBoard); the driver ends with the summary (metrics `summary/...` and summary.json), curves.png and the
run's status. metrics.jsonl stays the record: points that a failed attempt logged after its last checkpoint stay
in MLflow, which cannot delete them. MLflow errors while training are printed and the run goes on.

MLflow 3 refuses its file store (a local folder) unless MLFLOW_ALLOW_FILE_STORE=true; a `tracking.uri` that names
a local folder is that explicit choice, so this module sets it for the process.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Iterator
from urllib.parse import urlsplit

from distributed.config import Config, ConfigError, TrackingConfig
from distributed.metrics import MetricsLog
from distributed.run_folder import RunFolder, join, storage_uri

TRACKING_FILE = "tracking.json"  # in the run folder: {"backend", "uri", "experiment_id", "run_id"}
_NOT_PARAMS = ("tracking.",)  # where the run is tracked is not a parameter of the run (and a URL may hold a token)


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("tracking.backend=mlflow needs MLflow: pip install 'imagenet-ray[tracking]'") from None
    return mlflow


def mlflow_uri(cfg: TrackingConfig) -> str:
    """The driver's tracking URI, resolved once: `tracking.uri`, else $MLFLOW_TRACKING_URI or MLflow's default; a
    local folder becomes an absolute file:// URI, which the workers (in other directories) reach too."""
    uri = cfg.uri or _mlflow().get_tracking_uri()
    if urlsplit(uri).username or urlsplit(uri).password:  # it would be printed and kept in the run folder
        raise ConfigError("tracking.uri must not hold credentials; set MLFLOW_TRACKING_USERNAME / "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    return uri


def _client(uri: str):
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the file store, chosen explicitly (see the module's doc)
    return _mlflow().MlflowClient(uri)


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"optim.base_lr": "0.1", ...}: every config leaf as a string (lists and dicts as JSON)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key != "kwargs":
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, str) else json.dumps(value)
    return {k: v for k, v in out.items() if not k.startswith(_NOT_PARAMS)}


class MLflowTracker:
    """One MLflow run: metrics, params, the summary and artifacts, by its run id."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_record(self, record: dict) -> None:
        """One metrics.jsonl record: its numbers as `kind/key` at its step."""
        from mlflow.entities import Metric

        stamp = int(1000 * record.get("time", time.time()))
        metrics = [Metric(f"{record['kind']}/{k}", float(v), stamp, int(record["step"])) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "time")]
        self._try(lambda: self.client.log_batch(self.run_id, metrics=metrics), f"step {record['step']}")

    def finish(self, summary: dict, curves_png: bytes | None, finished: bool) -> None:
        """The summary as metrics and summary.json, curves.png, and FINISHED (or KILLED when stopped early)."""
        from mlflow.entities import Metric

        stamp = int(1000 * time.time())
        numbers = [Metric(f"summary/{k}", float(v), stamp, int(summary.get("steps") or 0)) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(self.run_id, metrics=numbers)
        self.client.log_dict(self.run_id, summary, "summary.json")
        if curves_png is not None:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "curves.png")
                with open(path, "wb") as f:
                    f.write(curves_png)
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")

    def _try(self, fn, what: str) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- a tracking outage must not stop training; metrics.jsonl keeps it
            print(f"tracking: MLflow logging failed at {what} ({type(e).__name__}: {str(e)[:200]}); "
                  f"metrics.jsonl keeps the record", flush=True)


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


def open_run(cfg: Config, run: RunFolder) -> MLflowTracker:
    """Resume the MLflow run named in the run folder's tracking.json, or create one; log the params it lacks."""
    uri = mlflow_uri(cfg.tracking)
    client = _client(uri)
    saved = json.loads(run.read_text(TRACKING_FILE) or "{}")
    run_id = saved.get("run_id") if saved.get("uri") == uri else None
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        have = client.get_run(run_id).data.params
    else:
        experiment_id = _experiment_id(client, cfg.tracking.experiment)
        run_id = client.create_run(experiment_id, run_name=cfg.run.name, tags={"run_uri": run.uri}).info.run_id
        run.write_text(TRACKING_FILE, json.dumps({"backend": "mlflow", "uri": uri, "experiment_id": experiment_id,
                                                  "run_id": run_id}, indent=1))
        have = {}
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flat_params(cfg.to_dict()).items() if k not in have]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    print(f"tracking: MLflow run {run_id} at {uri} ({'resumed' if have else 'new'}, experiment "
          f"{cfg.tracking.experiment!r})", flush=True)
    return MLflowTracker(uri, run_id)


class TrackedRun:
    """What the driver holds for the run: `finish(summary)` after training."""

    def __init__(self, cfg: Config, run: RunFolder, tracker: MLflowTracker | None):
        self.cfg, self.run, self.tracker = cfg, run, tracker

    def finish(self, summary: dict) -> None:
        if self.tracker is None:
            return
        curves = self.run.fs.cat_file(join(self.run.path, "curves.png")) if self.run.exists("curves.png") else None
        self.tracker.finish(summary, curves, finished=summary.get("epochs") == self.cfg.schedule.epochs)


@contextlib.contextmanager
def tracked_run(cfg: Config) -> Iterator[TrackedRun]:
    """The driver's side: open (or resume) the MLflow run before training; mark it FAILED if training raises."""
    run = RunFolder(join(storage_uri(cfg.run.storage_path), cfg.run.name))  # the run folder, as trainer.fit names it
    tracker = open_run(cfg, run) if cfg.tracking.backend == "mlflow" else None
    try:
        yield TrackedRun(cfg, run, tracker)
    except BaseException:
        if tracker is not None:
            tracker._try(lambda: tracker.client.set_terminated(tracker.run_id, "FAILED"), "the end of the run")
        raise


class TrackedMetricsLog(MetricsLog):
    """Rank 0's MetricsLog that also sends each record to the MLflow run named in tracking.json."""

    def __init__(self, run: RunFolder, attempt: int, resume_step: int, tracker: MLflowTracker):
        super().__init__(run, attempt, resume_step)
        self.tracker = tracker

    def log(self, record: dict) -> None:
        super().log(record)
        self.tracker.log_record(record)


def metrics_log(cfg: Config, run: RunFolder, attempt: int, resume_step: int) -> MetricsLog:
    """Rank 0's metrics log: MetricsLog, tracked in MLflow when `tracking.backend: mlflow`."""
    if cfg.tracking.backend != "mlflow":
        return MetricsLog(run, attempt, resume_step)
    saved = json.loads(run.read_text(TRACKING_FILE) or "{}")
    if not saved.get("run_id"):
        raise ConfigError(f"tracking.backend=mlflow but {run.url(TRACKING_FILE)} is missing: start training with "
                          "`python -m jobs.train`, which opens the MLflow run (distributed.tracking.tracked_run)")
    return TrackedMetricsLog(run, attempt, resume_step, MLflowTracker(saved["uri"], saved["run_id"]))
