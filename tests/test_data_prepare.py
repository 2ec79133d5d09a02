"""Layout -> shards: round trip, bad files reported, resume, half-written shards redone, Ray tasks on S3."""
import io
import json
import os
import tarfile
import uuid

import fsspec
import pytest

from data.index import read_index
from data.layout import ImageNetLayout
from data.prepare import prepare_dataset
from data.sample import make_sample
from data.shards import verify_shards
from data.stream import ShardStream

TINY = dict(classes=3, per_class=8, val_per_class=3, test=3, seed=2)
QUIET = dict(shard_size=5, log=lambda msg: None)


def _members(fs, path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _check_round_trip(src: str, dst: str, report: dict) -> None:
    index = read_index(dst)
    layout = ImageNetLayout(src)
    assert index.classes == report["wnids"] and index.class_names == report["class_names"]
    assert {k: v.samples for k, v in index.splits.items()} == {"train": 23, "val": 9, "test": 3}
    assert index.bad_files == 1 and index.splits["train"].bad_files == 1
    assert [s.name for s in index.splits["train"].shards] == [f"train/train-{i:06d}.tar" for i in range(5)]
    fs, root = fsspec.core.url_to_fs(dst)
    bad = json.loads(fs.cat_file(f"{root}/bad_files.json"))
    assert bad["count"] == 1 and bad["files"][0]["key"] == report["special"]["truncated"]
    assert "truncated" in bad["files"][0]["reason"] and bad["files"][0]["path"].endswith(".JPEG")

    sources = {s.key: s for split in ("train", "val", "test") for s in layout.samples(split)}
    labels_per_shard = []
    for split, si in index.splits.items():
        keys = []
        for shard in si.shards:
            members = _members(fs, f"{root}/{shard.name}")
            names = [n for n, _ in members]
            exts = ["jpg", "cls", "json"] if split != "test" else ["jpg", "json"]
            assert len(names) == shard.samples * len(exts)
            shard_labels = set()
            for (name, data), ext in zip(members, exts * shard.samples):
                key = name.split(".")[0]
                assert name == f"{key}.{ext}"
                src_sample = sources[key]
                if ext == "jpg":
                    assert data == layout.read_bytes(src_sample)  # original bytes, not re-encoded
                    keys.append(key)
                elif ext == "cls":
                    assert int(data) == src_sample.label
                    shard_labels.add(int(data))
                else:
                    meta = json.loads(data)
                    assert meta["wnid"] == src_sample.wnid and meta["width"] >= 96 and meta["height"] >= 96
                    assert [b["xmin"] for b in meta["boxes"]] == [b.xmin for b in src_sample.boxes]
            labels_per_shard.append(shard_labels)
        if split != "train":
            assert keys == sorted(keys)
    assert sum(len(s) > 1 for s in labels_per_shard[:4]) >= 3  # train shards mix classes
    assert verify_shards(dst)["problems"] == []
    stream = ShardStream(dst, "val", batch_size=4, train=False, transform=lambda x: x[:, :8, :8])
    assert sorted(k for b in stream for k in b["key"]) == sorted(s.key for s in layout.samples("val"))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip(tmp_path, where):
    base = str(tmp_path) if where == "local" else f"memory://prep-{uuid.uuid4().hex[:8]}"
    report = make_sample(f"{base}/raw", **TINY)
    summary = prepare_dataset(f"{base}/raw", f"{base}/shards", **QUIET)
    assert summary["shards"] == 8 and summary["skipped"] == 0 and summary["bad_files"] == 1
    _check_round_trip(f"{base}/raw", f"{base}/shards", report)
    if where == "memory":
        fsspec.filesystem("memory").rm(base, recursive=True)


def test_resume_skips_finished_and_redoes_broken_shards(tmp_path):
    src, dst = str(tmp_path / "raw"), tmp_path / "shards"
    make_sample(src, **TINY)
    prepare_dataset(src, str(dst), **QUIET)
    before = {p.name: p.read_bytes() for p in (dst / "train").glob("*.tar")}
    again = prepare_dataset(src, str(dst), **QUIET)
    assert again["skipped"] == again["shards"] == 8

    # A crash leaves a temporary; a truncated final file; a same-size file with flipped bytes; a lost sidecar.
    (dst / "train/train-000001.tar.tmp-0123abcd").write_bytes(b"half a shard")
    (dst / "train/train-000000.tar").write_bytes(before["train-000000.tar"][:-1024])
    flipped = bytearray(before["train-000002.tar"])
    flipped[700] ^= 0xFF
    (dst / "train/train-000002.tar").write_bytes(bytes(flipped))
    (dst / "train/train-000003.tar.done.json").unlink()
    logs = []
    redo = prepare_dataset(src, str(dst), shard_size=5, log=logs.append)
    assert redo["skipped"] == 5 and redo["stale_temporaries_removed"] == 1
    assert any("images/s" in line and "8/8 shards" in line for line in logs)
    assert not list((dst / "train").glob("*.tmp-*"))
    assert {p.name: p.read_bytes() for p in (dst / "train").glob("*.tar")} == before  # byte-identical redo
    assert verify_shards(str(dst))["problems"] == []


def test_index_is_removed_until_all_shards_are_done(tmp_path, monkeypatch):
    src, dst = str(tmp_path / "raw"), str(tmp_path / "shards")
    make_sample(src, **TINY)
    prepare_dataset(src, dst, **QUIET)
    import data.prepare as prepare

    def fail_on_val(src_url, dst_url, plan, check_sha=True):
        if plan.split == "val":
            raise OSError("node lost")
        return real(src_url, dst_url, plan, check_sha)

    real = prepare.write_shard
    monkeypatch.setattr(prepare, "write_shard", fail_on_val)
    with pytest.raises(OSError, match="node lost"):
        prepare_dataset(src, dst, shard_size=4, log=lambda m: None)  # a new plan: every shard is redone
    assert not os.path.exists(f"{dst}/index.json")
    monkeypatch.setattr(prepare, "write_shard", real)
    summary = prepare_dataset(src, dst, shard_size=4, log=lambda m: None)
    # kept: the 6 train shards the failed run finished, and the test shard (3 samples: the same plan as before)
    assert summary["skipped"] == 7
    assert read_index(dst).splits["train"].shards[0].samples == 4


def test_cli_arguments():
    from jobs.prepare import parse_args

    args = parse_args(["--src", "a", "--dst", "b", "--splits", "val,test", "--shard-size", "7"])
    assert args.splits == ["val", "test"] and args.shard_size == 7
    with pytest.raises(SystemExit):
        parse_args(["--src", "a", "--dst", "b", "--splits", "train,bogus"])


@pytest.mark.slow
def test_ray_tasks_from_and_to_s3(s3_bucket, ray_local):
    from jobs.prepare import prepare

    src, dst = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/shards"
    report = make_sample(src, **TINY)
    # Ray's processes inherit the S3 endpoint and keys from the environment (ray_local starts after s3_server);
    # passing them in a runtime_env would write them into Ray's logs (tests/test_security.py looks there).
    summary = prepare(src, dst, shard_size=5)
    assert summary["shards"] == 8 and summary["bad_files"] == 1
    _check_round_trip(src, dst, report)
    fsspec.filesystem("s3").invalidate_cache()
    assert prepare(src, dst, shard_size=5)["skipped"] == 8


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path):
    src, dst = tmp_path / "raw", str(tmp_path / "shards")
    make_sample(str(src), **TINY)
    csv = src / "LOC_train_solution.csv"
    lines = csv.read_text().splitlines()
    key, pred = lines[1].split(",")
    wnid = pred.split()[0]
    lines[1] = f"{key},{wnid} -4 3 9999 20 {wnid} 5000 5000 6000 6000"  # one box reaches out, one lies outside
    csv.write_text("\n".join(lines) + "\n")
    prepare_dataset(str(src), dst, splits=["train"], **QUIET)
    index = read_index(dst)
    assert (index.extra["boxes_clipped"], index.extra["boxes_dropped"]) == (1, 1)
    fs = fsspec.filesystem("file")
    for shard in index.splits["train"].shards:
        for name, data in _members(fs, f"{dst}/{shard.name}"):
            if name == f"{key}.json":
                meta = json.loads(data)
                assert meta["boxes"] == [{"wnid": wnid, "xmin": 0, "ymin": 3, "xmax": meta["width"], "ymax": 20}]
