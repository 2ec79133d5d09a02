"""Storage access: the one retry function and its numbers (for data reads and for the run folder's writes), and
the URL -> (fsspec filesystem, root path) helper every reader and writer uses.

Policy: an operation is tried up to ATTEMPTS times with exponential backoff (BASE_DELAY_S, doubling, at most
MAX_DELAY_S) between tries. The run folder (distributed/run_folder.py: config, metrics, summary) uses the same
function with more tries (RUN_FOLDER_ATTEMPTS from RUN_FOLDER_BASE_DELAY_S: 23 s of waiting in all, enough to ride
out a storage outage of ~20 s without failing a training attempt), prints each retry and re-raises the original
error. Errors that reading again cannot fix are raised at once: a missing file, a refused
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
RUN_FOLDER_ATTEMPTS = 6  # backoff 1+2+4+8+8 = 23 s between attempts
RUN_FOLDER_BASE_DELAY_S = 1.0
# Errors that are answers, not outages (s3fs maps NoSuchKey/AccessDenied to the first two).
FINAL_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                 NotADirectoryError, FileExistsError)
NOT_RETRIED = FINAL_ERRORS + (ValueError,)  # data reads: a malformed shard or index does not heal either

T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed ATTEMPTS times in a row (the message names what and the last error)."""


def backoff_s(attempt: int, base_delay_s: float | None = None) -> float:
    """Seconds to wait after failed try number `attempt` (1-based)."""
    return min((BASE_DELAY_S if base_delay_s is None else base_delay_s) * 2 ** (attempt - 1), MAX_DELAY_S)


def retry(fn: Callable[[], T], what: str, *, error: type[OSError] | None = StorageError,
          not_retried: tuple[type[BaseException], ...] = NOT_RETRIED, attempts: int | None = None,
          base_delay_s: float | None = None, announce: bool = False) -> T:
    """`fn()` under the policy (ATTEMPTS tries from BASE_DELAY_S unless given); after the last failed try raises
    `error` naming `what` and the last error, or the last error itself with error=None. `announce` prints each retry."""
    attempts = ATTEMPTS if attempts is None else attempts
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except not_retried:
            raise
        except Exception as e:  # noqa: BLE001 -- network and storage errors come in many types (botocore, aiohttp)
            if attempt == attempts:
                if error is None:
                    raise
                raise error(f"{what}: failed {attempt} times in a row, last: {type(e).__name__}: {e}") from e
            delay = backoff_s(attempt, base_delay_s)
            if announce:
                print(f"storage: {what} failed ({type(e).__name__}: {str(e)[:200]}); retry {attempt}/{attempts - 1} "
                      f"in {delay:g} s", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def fs_and_root(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path without a trailing slash) of a local path or fsspec URL (s3://, gs://, ...)."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")
