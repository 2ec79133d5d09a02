"""The run's metrics log (distributed/metrics.py): parts written in the background, read back by the one reader,
a failed attempt's records dropped past its restore point, TensorBoard event files each uploaded once."""
from __future__ import annotations

import json

import pytest

from distributed.metrics import MetricsLog, read_metrics, write_metrics_jsonl
from distributed.run_folder import RunFolder


def _train(step: int) -> dict:
    return {"kind": "train", "epoch": 0, "step": step, "loss": 1.0 / step, "time": 0.0}


def _attempts(run: RunFolder) -> None:
    first = MetricsLog(run, attempt=0, restored_step=0)
    for step in (1, 2):
        first.log(_train(step))
    first.flush()
    for step in (3, 4, 5):  # logged after the step-2 checkpoint; this attempt then dies at step 5
        first.log(_train(step))
    first.flush()
    first.uploader.close()  # (a killed process would just stop; its parts are on storage)
    second = MetricsLog(run, attempt=1, restored_step=2)
    for step in (3, 4):
        second.log(_train(step))
    second.log({"kind": "eval", "epoch": 1, "step": 4, "val_top1": 0.5})
    second.close()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parts_and_attempts_read_back_in_order(where, tmp_path, request):
    if where == "s3":
        url = f"s3://{request.getfixturevalue('s3_bucket')}/runs/m"
    else:
        url = str(tmp_path / "runs" / "m")
    run = RunFolder(url)
    _attempts(run)
    records = read_metrics(run)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                         ("eval", 4)]
    assert records[2]["loss"] == pytest.approx(1 / 3)
    parts = run.list("metrics")
    assert parts == ["00000-000000.jsonl", "00000-000001.jsonl", "00001-000000.jsonl"]
    events = run.list("tensorboard")
    assert events and all(name.startswith("events.out.tfevents.") for name in events)
    if where == "s3":  # rotated at each flush, each closed file uploaded once: 2 flushes of attempt 0, 1 close
        assert len(events) == 3
    write_metrics_jsonl(run)
    assert [json.loads(line) for line in run.read_text("metrics.jsonl").splitlines()] == records


def test_an_old_run_folder_has_only_metrics_jsonl(tmp_path):
    run = RunFolder(str(tmp_path))
    run.write_jsonl("metrics.jsonl", [_train(1), _train(2)])
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_a_failed_upload_is_raised_in_the_training_thread(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = RunFolder(str(tmp_path / "runs" / "m"))
    log = MetricsLog(run, attempt=0, restored_step=0)
    run.path = f"{blocker}/m"  # the run folder becomes unwritable after start-up
    log.log(_train(1))
    log.flush()
    with pytest.raises(RuntimeError, match="uploading metrics to the run folder failed"):
        log.close()
