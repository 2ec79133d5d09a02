"""Storage access for the data package: one retry policy (its numbers live here only) and the URL -> (fsspec
filesystem, root path) helper every reader and writer uses.

Policy: an operation is tried up to ATTEMPTS times with exponential backoff (BASE_DELAY_S, doubling, at most
MAX_DELAY_S) between tries. Errors that reading again cannot fix are raised at once: a missing file, a refused
permission, and ValueErrors (a malformed shard or index; `ShardFormatError`, `ShardIntegrityError` and
`ShardIndexError` are ValueErrors). The object-store clients (s3fs, gcsfs) retry single requests on their own;
this policy covers what reaches us anyway (a reset connection mid-body, a 503 that outlived the client's
retries, a stalled mount).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import fsspec

ATTEMPTS = 4  # tries per operation
BASE_DELAY_S = 0.5  # backoff before the 2nd, 3rd, 4th try: 0.5 s, 1 s, 2 s
MAX_DELAY_S = 8.0
NOT_RETRIED: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                NotADirectoryError, ValueError)

T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed ATTEMPTS times in a row (the message names what and the last error)."""


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed try number `attempt` (1-based)."""
    return min(BASE_DELAY_S * 2 ** (attempt - 1), MAX_DELAY_S)


def retry(fn: Callable[[], T], what: str, *, error: type[OSError] = StorageError,
          not_retried: tuple[type[BaseException], ...] = NOT_RETRIED) -> T:
    """`fn()` under the policy; after the last failed try raises `error` naming `what` and the last error."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except not_retried:
            raise
        except Exception as e:  # network and storage hiccups
            if attempt == ATTEMPTS:
                raise error(f"{what}: failed {attempt} times in a row, last: {type(e).__name__}: {e}") from e
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")


def fs_and_root(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path without a trailing slash) of a local path or fsspec URL (s3://, gs://, ...)."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")
