"""The run folder `{storage_path}/{name}/` beside Ray's checkpoints: config, attempts, metrics, TensorBoard, summary.

Written through fsspec, so it works on a local path, s3:// or gs://. Each file is written whole under a
temporary name and then moved over the final one (distributed/metrics.py appends by writing new parts). On
object stores every operation is retried with exponential backoff (1, 2, 4, 8, 8 s) on top of the client's own
retries, so a storage outage of tens of seconds delays the run instead of failing it; a missing file or a
refused permission is an answer, not an outage, and is not retried.

`storage_filesystem` gives Ray Train's checkpoint uploads the same patience (pyarrow's S3 client).
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from data import storage


STORAGE_ATTEMPTS = storage.RUN_FOLDER_ATTEMPTS


def retry(fn, what: str, attempts: int = STORAGE_ATTEMPTS):
    """fn() under the run folder's retry policy (data/storage.py): wait 1, 2, 4, 8, 8 s between `attempts` calls,
    print each retry, re-raise the last error."""
    return storage.retry(fn, what, error=None, not_retried=storage.FINAL_ERRORS, attempts=attempts,
                         base_delay_s=storage.RUN_FOLDER_BASE_DELAY_S, announce=True)


S3_MAX_ATTEMPTS = 10  # AWS "default" strategy: 25 ms x 2^n between attempts, about 25 s in all


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with AWS's default retry strategy, which survives pickling.

    pyarrow's own pickling drops retry_strategy, and Ray pickles the storage filesystem to every worker, where
    checkpoints are uploaded.
    """

    def __init__(self, max_attempts: int, **options):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts), **options)
        self.max_attempts = max_attempts

    def __reduce__(self):
        return _retrying_s3, (self.max_attempts, super().__reduce__()[1][0])


def _retrying_s3(max_attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **options)


def storage_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for Ray Train's RunConfig: s3:// gets an S3 client that retries with backoff.

    pyarrow's default S3 client tries 3 times (AWS "standard" strategy) and gave up about 6 s into an outage
    here; with `S3_MAX_ATTEMPTS` it rode out 10 s. Other URLs and local paths: (None, uri), Ray resolves them.
    """
    if not uri.startswith("s3://"):
        return None, uri
    # from_uri resolves the region and reads the endpoint from the environment and the URI's query string.
    base, path = pafs.FileSystem.from_uri(uri)
    options = base.__reduce__()[1][0]  # its settings; credentials only if given explicitly, else None
    return RetryingS3FileSystem(S3_MAX_ATTEMPTS, **options), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def storage_uri(storage_path: str) -> str:
    """Local storage paths become absolute (Ray needs that); URLs stay as they are."""
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


class RunFolder:
    """Files of one run; on object stores each operation is retried (`attempts` calls at most)."""

    def __init__(self, uri: str, attempts: int = STORAGE_ATTEMPTS):
        self.uri = uri.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.uri)
        self._local = isinstance(self.fs, LocalFileSystem)
        self.attempts = 1 if self._local else attempts

    @property
    def is_local(self) -> bool:
        return self._local

    def _retry(self, fn, what: str):
        return retry(fn, f"{what} {self.uri}", self.attempts)

    def list(self, name: str = "") -> list[str]:
        """Names of the entries in the folder `name` ([] when it does not exist)."""
        path = join(self.path, name) if name else self.path

        def ls():
            self.fs.invalidate_cache(path)
            try:
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
            except FileNotFoundError:
                return []

        return self._retry(ls, f"listing {name or '.'} in")

    def url(self, name: str) -> str:
        return join(self.uri, name)

    def exists(self, name: str) -> bool:
        return self._retry(lambda: self.fs.exists(join(self.path, name)), f"checking {name} in")

    def _tmp_for(self, name: str) -> str:
        """A temporary name beside `name` (which may hold a sub-folder), its folder made."""
        folder, _, base = join(self.path, name).rpartition("/")
        self.fs.makedirs(folder, exist_ok=True)
        return f"{folder}/.{base}.{uuid.uuid4().hex[:8]}.tmp"

    def write_text(self, name: str, text: str) -> None:
        def write():
            tmp = self._tmp_for(name)
            with self.fs.open(tmp, "w") as f:
                f.write(text)
            self.fs.mv(tmp, join(self.path, name))

        self._retry(write, f"writing {name} to")

    def read_text(self, name: str) -> str | None:
        def read():
            try:
                with self.fs.open(join(self.path, name), "r") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        return self._retry(read, f"reading {name} from")

    def read_jsonl(self, name: str) -> list[dict]:
        text = self.read_text(name) or ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        self.write_text(name, "".join(json.dumps(r) + "\n" for r in records))

    def put_file(self, local_path: str, name: str) -> None:
        def put():
            tmp = self._tmp_for(name)
            self.fs.put_file(local_path, tmp)
            self.fs.mv(tmp, join(self.path, name))

        self._retry(put, f"uploading {name} to")

    def local_dir(self, name: str) -> str:
        """A local directory for `name`: the run folder itself when local, else a temp dir to upload from."""
        if self._local:
            path = join(self.path, name)
            os.makedirs(path, exist_ok=True)
            return path
        return tempfile.mkdtemp(prefix=f"{name}-")
