"""The run folder `{storage_path}/{name}/` beside Ray's checkpoints: config, metrics.jsonl, TensorBoard, summary.

Written through fsspec, so it works on a local path, s3:// or gs://. Object stores cannot append, so each
file is rewritten whole under a temporary name and then moved over the final one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def storage_uri(storage_path: str) -> str:
    """Local storage paths become absolute (Ray needs that); URLs stay as they are."""
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


class RunFolder:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.uri)
        self._local = isinstance(self.fs, LocalFileSystem)

    def url(self, name: str) -> str:
        return join(self.uri, name)

    def exists(self, name: str) -> bool:
        return self.fs.exists(join(self.path, name))

    def write_text(self, name: str, text: str) -> None:
        final = join(self.path, name)
        tmp = join(self.path, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.makedirs(self.path, exist_ok=True)
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        self.fs.mv(tmp, final)

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open(join(self.path, name), "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_jsonl(self, name: str) -> list[dict]:
        text = self.read_text(name) or ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        self.write_text(name, "".join(json.dumps(r) + "\n" for r in records))

    def put_file(self, local_path: str, name: str) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        tmp = join(self.path, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        self.fs.put_file(local_path, tmp)
        self.fs.mv(tmp, join(self.path, name))

    def local_dir(self, name: str) -> str:
        """A local directory for `name`: the run folder itself when local, else a temp dir to `sync_dir` later."""
        if self._local:
            path = join(self.path, name)
            os.makedirs(path, exist_ok=True)
            return path
        return tempfile.mkdtemp(prefix=f"{name}-")

    def sync_dir(self, local: str, name: str) -> None:
        """Upload a local directory's files into `name/` (no-op when the run folder is local)."""
        if self._local:
            return
        for root, _, files in os.walk(local):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), local)
                self.fs.put_file(os.path.join(root, f), join(self.path, name, rel))


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars, kept by rank 0; flushed to the run folder at each report."""

    def __init__(self, run: RunFolder, resume_step: int):
        # Records after the restored step were lost with the failed attempt: drop them so the log stays true.
        self.run = run
        self.records = [r for r in run.read_jsonl("metrics.jsonl") if r.get("step", 0) <= resume_step]
        from torch.utils.tensorboard import SummaryWriter

        self.tb_local = run.local_dir("tensorboard")
        self.tb = SummaryWriter(self.tb_local)

    def log(self, record: dict) -> None:
        self.records.append(record)
        kind, step = record["kind"], record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def flush(self) -> None:
        self.run.write_jsonl("metrics.jsonl", self.records)
        self.tb.flush()
        self.run.sync_dir(self.tb_local, "tensorboard")

    def close(self) -> None:
        self.flush()
        self.tb.close()
        if not self.run._local:
            shutil.rmtree(self.tb_local, ignore_errors=True)
