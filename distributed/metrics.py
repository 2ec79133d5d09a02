"""A run's metrics (JSON lines) and TensorBoard events, written by rank 0 without stopping training.

Object stores cannot append, so each flush writes only the records since the previous one, as a new part
`metrics/<attempt:05d>-<part:06d>.jsonl`. `read_metrics` is the one reader: it concatenates the parts in name
order, and the record that opens each attempt ({"kind": "attempt", "restored_step": s}) drops what a failed
attempt logged after step s. TensorBoard's event file is closed and a new one opened at each flush, and each
closed file is uploaded once (a local run folder is written in place). Uploads run in order on one background
thread, retried like every run-folder write; `close()` waits for them, and an upload that failed for good is
raised in the training thread at the next flush. The driver writes the concatenation to `metrics.jsonl` when the
run ends, for people and tools (`write_metrics_jsonl`).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading

from distributed.run_folder import RunFolder

PARTS = "metrics"
JSONL = "metrics.jsonl"


def _keep(records: list[dict], record: dict) -> list[dict]:
    if record.get("kind") == "attempt":  # a new attempt resumed at restored_step: later records were lost
        return [r for r in records if r.get("step", 0) <= record["restored_step"]]
    return records + [record]


def read_metrics(run: RunFolder | str) -> list[dict]:
    """Every metrics record of a run in order, without those of failed attempts after their restore point.

    Reads the parts under `metrics/`; a run folder written before parts existed has only metrics.jsonl.
    """
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    names = run.list(PARTS)
    if not names:
        return [r for r in run.read_jsonl(JSONL) if r.get("kind") != "attempt"]
    records: list[dict] = []
    for name in sorted(n for n in names if n.endswith(".jsonl")):
        for record in run.read_jsonl(f"{PARTS}/{name}"):
            records = _keep(records, record)
    return [r for r in records if r.get("kind") != "attempt"]


def write_metrics_jsonl(run: RunFolder) -> None:
    """The concatenated log as one metrics.jsonl (the driver, after the run)."""
    if run.list(PARTS):
        run.write_jsonl(JSONL, read_metrics(run))


class _Uploader:
    """One background thread running uploads in order; the first failure is kept and raised by `check()`."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="metrics-upload")
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 -- kept and raised in the training thread
                self.error = e
            finally:
                self.jobs.task_done()
        self.jobs.task_done()

    def submit(self, job) -> None:
        self.check()
        self.jobs.put(job)

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"uploading metrics to the run folder failed: {self.error}") from self.error

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.check()


class MetricsLog:
    """Rank 0's metrics: JSON records and TensorBoard scalars, flushed to the run folder in the background."""

    def __init__(self, run: RunFolder, attempt: int, restored_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.attempt, self.part = run, attempt, 0
        self.pending: list[dict] = [{"kind": "attempt", "attempt": attempt, "step": restored_step,
                                     "restored_step": restored_step}]
        self.uploader = _Uploader()
        self.tb_local = run.local_dir("tensorboard")
        self.tb_outbox = self.tb_local if run.is_local else self.tb_local + "-closed"
        os.makedirs(self.tb_outbox, exist_ok=True)
        # purge_step: TensorBoard drops the events a failed attempt wrote after the restored step.
        self._writer_cls = SummaryWriter
        self.tb = SummaryWriter(self.tb_local, purge_step=restored_step + 1)

    def log(self, record: dict) -> None:
        self.pending.append(record)
        kind, step = record["kind"], record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch", "time"):
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def flush(self, reopen: bool = True) -> None:
        """Queue the records since the last flush as a new part and the current event file for upload."""
        records, self.pending = self.pending, []
        if records:
            name = f"{PARTS}/{self.attempt:05d}-{self.part:06d}.jsonl"
            self.part += 1
            self.uploader.submit(lambda n=name, r=records: self.run.write_jsonl(n, r))
        if self.run.is_local:
            self.tb.flush()
            return
        self.tb.close()  # the event file is complete: upload it once, then start the next one
        for event_file in os.listdir(self.tb_local):
            closed = os.path.join(self.tb_outbox, event_file)
            os.replace(os.path.join(self.tb_local, event_file), closed)
            self.uploader.submit(lambda p=closed, n=event_file: (self.run.put_file(p, f"tensorboard/{n}"), os.unlink(p)))
        if reopen:
            self.tb = self._writer_cls(self.tb_local)

    def close(self) -> None:
        self.flush(reopen=False)
        self.tb.close()
        self.uploader.close()
        if not self.run.is_local:
            shutil.rmtree(self.tb_local, ignore_errors=True)
            shutil.rmtree(self.tb_outbox, ignore_errors=True)
