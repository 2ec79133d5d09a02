"""The shard folder's index: identity, atomic replacement, a reader noticing a changed index, retried reads."""
import json
import os

import pytest
from fsspec.implementations.local import LocalFileSystem

import data.storage as storage
from data.index import (DatasetIndex, IndexChangedError, ShardIndexError, ShardInfo, SplitIndex, bad_files_url,
                        check_index_unchanged, index_url, read_index, sidecar_url, write_index)


def _index(val_samples: int = 3, seed: int = 0) -> DatasetIndex:
    return DatasetIndex(["n00000001", "n00000002"], ["a", "b"], {
        "train": SplitIndex([ShardInfo("train/train-000000.tar", 5, 5120, "ab" * 32)], 5),
        "val": SplitIndex([ShardInfo("val/val-000000.tar", val_samples, 4096, "cd" * 32)], val_samples)},
        extra={"seed": seed})


def test_paths_of_the_folder_layout():
    assert index_url("s3://b/ds/") == "s3://b/ds/_index.json"
    assert sidecar_url("s3://b/ds", "train/train-000003.tar") == "s3://b/ds/_meta/train/train-000003.tar.json"
    assert bad_files_url("/d") == "/d/_meta/bad_files.json"


def test_identity_is_a_digest_of_the_content(tmp_path):
    write_index(str(tmp_path), _index())
    got = read_index(str(tmp_path))
    assert got.identity == _index().identity == json.loads((tmp_path / "_index.json").read_text())["identity"]
    assert _index(seed=1).identity != got.identity and _index(seed=1).split_identity("train") == \
        got.split_identity("train")
    assert _index(val_samples=4).split_identity("val") != got.split_identity("val")


def test_a_replaced_index_is_never_missing_and_leaves_no_temporaries(tmp_path, monkeypatch):
    write_index(str(tmp_path), _index())
    seen = []
    real_mv = LocalFileSystem.mv

    def spy(self, src, dst, **kw):
        seen.append(os.path.exists(dst))  # the old index is still in place when the new one moves over it
        return real_mv(self, src, dst, **kw)

    monkeypatch.setattr(LocalFileSystem, "mv", spy)
    write_index(str(tmp_path), _index(seed=2))
    assert seen == [True] and sorted(os.listdir(tmp_path)) == ["_index.json"]
    assert read_index(str(tmp_path)).extra["seed"] == 2


def test_a_reader_notices_a_changed_index(tmp_path):
    url = str(tmp_path)
    write_index(url, _index())
    at_start = read_index(url)
    check_index_unchanged(url, at_start)
    write_index(url, _index())  # rewritten with equal content: the same dataset
    check_index_unchanged(url, at_start)
    write_index(url, _index(val_samples=4))
    check_index_unchanged(url, at_start, split="train")  # the train split's readers are not affected
    with pytest.raises(IndexChangedError, match=r"_index.json: split 'val' changed under a running job"):
        check_index_unchanged(url, at_start, split="val")
    with pytest.raises(IndexChangedError, match=r"the index changed under a running job .*jobs.prepare. was re-run"):
        check_index_unchanged(url, at_start)
    os.remove(tmp_path / "_index.json")
    with pytest.raises(IndexChangedError, match="no longer reads as its index .*not found"):
        check_index_unchanged(url, at_start)


def test_transient_read_errors_are_retried_missing_files_are_not(tmp_path, monkeypatch):
    write_index(str(tmp_path), _index())
    monkeypatch.setattr(storage, "BASE_DELAY_S", 0.0)
    real, failures = LocalFileSystem.cat_file, []

    def flaky(self, path, *a, **k):
        if len(failures) < 2:
            failures.append(path)
            raise ConnectionError("connection reset")
        return real(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    assert read_index(str(tmp_path)).identity == _index().identity and len(failures) == 2
    failures.clear()
    monkeypatch.setattr(storage, "ATTEMPTS", 2)
    with pytest.raises(OSError, match=r"_index.json: failed 2 times in a row, last: ConnectionError"):
        read_index(str(tmp_path))
    with pytest.raises(ShardIndexError, match="not found"):
        read_index(str(tmp_path / "absent"))
