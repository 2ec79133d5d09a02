"""Layout -> shards: round trip, bad files reported, resume, half-written shards redone, storage normalisation and
--max-side, sample offsets in the sidecars, live-folder safety, Ray tasks on S3."""
import io
import json
import os
import tarfile
import uuid

import fsspec
import pytest

from data.decode import jpeg_header
from data.encode import StoreOptions
from data.index import read_index, sidecar_url
from data.layout import ImageNetLayout
from data.prepare import prepare_dataset
from data.sample import make_sample
from data.shards import read_samples, verify_shards
from data.stream import ShardStream

TINY = dict(classes=3, per_class=8, val_per_class=3, test=3, seed=2)
QUIET = dict(shard_size=5, log=lambda msg: None)


def _members(fs, path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _check_stored_image(data: bytes, meta: dict, source: bytes, report: dict) -> None:
    """Every stored image is a baseline 3-component JPEG; the odd sources were converted, the rest kept as is."""
    header = jpeg_header(data)
    assert header is not None and (header.process, header.components) == ("baseline", 3)
    assert (header.width, header.height) == (meta["width"], meta["height"])
    special = {v: k for k, v in report["special"].items()}.get(meta["key"])
    expected = {"cmyk": ("JPEG", "CMYK", ["mode"]), "grayscale": ("JPEG", "L", ["mode"]),
                "png_as_jpeg": ("PNG", "RGB", ["format"])}.get(special, ("JPEG", "RGB", []))
    assert (meta["format"], meta["mode"], meta["reencoded"]) == expected
    assert (data == source) == (expected[2] == [])  # original bytes unless converted


def _check_round_trip(src: str, dst: str, report: dict) -> None:
    index = read_index(dst)
    layout = ImageNetLayout(src)
    assert index.classes == report["wnids"] and index.class_names == report["class_names"]
    assert {k: v.samples for k, v in index.splits.items()} == {"train": 23, "val": 9, "test": 3}
    assert index.bad_files == 1 and index.splits["train"].bad_files == 1
    assert [s.name for s in index.splits["train"].shards] == [f"train/train-{i:06d}.tar" for i in range(5)]
    fs, root = fsspec.core.url_to_fs(dst)
    bad = json.loads(fs.cat_file(f"{root}/_meta/bad_files.json"))
    assert bad["count"] == 1 and bad["files"][0]["key"] == report["special"]["truncated"]
    assert "truncated" in bad["files"][0]["reason"] and bad["files"][0]["path"].endswith(".JPEG")

    sources = {s.key: s for split in ("train", "val", "test") for s in layout.samples(split)}
    labels_per_shard, stored = [], {}
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
                    stored[key] = data
                    keys.append(key)
                elif ext == "cls":
                    assert int(data) == src_sample.label
                    shard_labels.add(int(data))
                else:
                    meta = json.loads(data)
                    assert meta["wnid"] == src_sample.wnid and meta["width"] >= 96 and meta["height"] >= 96
                    assert [b["xmin"] for b in meta["boxes"]] == [b.xmin for b in src_sample.boxes]
                    _check_stored_image(stored[key], meta, layout.read_bytes(src_sample), report)
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
    (dst / "train/_train-000001.tar.tmp-0123abcd").write_bytes(b"half a shard")
    (dst / "_meta/train/_train-000001.tar.json.tmp-0123abcd").write_bytes(b"half a sidecar")
    (dst / "train/train-000000.tar").write_bytes(before["train-000000.tar"][:-1024])
    flipped = bytearray(before["train-000002.tar"])
    flipped[700] ^= 0xFF
    (dst / "train/train-000002.tar").write_bytes(bytes(flipped))
    (dst / "_meta/train/train-000003.tar.json").unlink()
    logs = []
    redo = prepare_dataset(src, str(dst), shard_size=5, log=logs.append)
    assert redo["skipped"] == 5 and redo["stale_temporaries_removed"] == 2
    assert any("images/s" in line and "8/8 shards" in line for line in logs)
    assert not list((dst / "train").glob("*.tmp-*"))
    assert sorted(os.listdir(dst / "train")) == sorted(before)  # shards only: no sidecars beside them
    assert {p.name: p.read_bytes() for p in (dst / "train").glob("*.tar")} == before  # byte-identical redo
    assert verify_shards(str(dst))["problems"] == []


def test_live_folder_keeps_its_index_and_refuses_a_changed_plan(tmp_path, monkeypatch):
    src, dst = str(tmp_path / "raw"), str(tmp_path / "shards")
    make_sample(src, **TINY)
    first = prepare_dataset(src, dst, **QUIET)
    live = read_index(dst)
    assert first["identity"] == live.identity
    import data.prepare as prepare

    def fail_on_val(src_url, dst_url, plan, options=StoreOptions(), check_sha=True, live_sha=None):
        if plan.split == "val":
            raise OSError("node lost")
        return real(src_url, dst_url, plan, options, check_sha, live_sha)

    # A re-run that dies half-way: the index a running job reads is there all along, unchanged.
    real = prepare.write_shard
    (tmp_path / "shards/_meta/train/train-000001.tar.json").unlink()  # forces a (byte-identical) rewrite
    monkeypatch.setattr(prepare, "write_shard", fail_on_val)
    before = (tmp_path / "shards/train/train-000001.tar").read_bytes()
    with pytest.raises(OSError, match="node lost"):
        prepare_dataset(src, dst, **QUIET)
    assert read_index(dst).identity == live.identity
    assert (tmp_path / "shards/train/train-000001.tar").read_bytes() == before
    monkeypatch.setattr(prepare, "write_shard", real)

    # Another plan would rewrite listed shards with other content: refused before anything is written.
    stamp = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "shards").rglob("*")}
    for changed in (dict(shard_size=4), dict(seed=1), dict(options=StoreOptions(max_side=64))):
        with pytest.raises(ValueError, match="was prepared from a different plan.*prepare into a new folder"):
            prepare_dataset(src, dst, **{**QUIET, **changed})
    assert {p: os.stat(p).st_mtime_ns for p in (tmp_path / "shards").rglob("*")} == stamp
    for sidecar in (tmp_path / "shards/_meta/train").glob("*.json"):
        sidecar.unlink()  # no sidecar to tell: the new bytes decide
    with pytest.raises(ValueError, match="train-00000.\\.tar is listed .* would be rewritten with other content"):
        prepare_dataset(src, dst, **{**QUIET, "seed": 1})
    assert read_index(dst).identity == live.identity and verify_shards(dst)["problems"] == []
    prepare_dataset(src, dst, **QUIET)  # the same plan repairs the sidecar

    # Preparing one split again carries the others over: the train split's readers see the same split identity.
    again = prepare_dataset(src, dst, splits=["val"], **QUIET)
    assert again["carried_splits"] == ["test", "train"] and again["skipped"] == 2
    assert read_index(dst).split_identity("train") == live.split_identity("train")
    assert json.loads((tmp_path / "shards/_meta/bad_files.json").read_text())["count"] == 1


def test_old_layout_is_refused(tmp_path):
    src, old = str(tmp_path / "raw"), tmp_path / "old"
    make_sample(src, **TINY)
    old.mkdir()
    (old / "index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"old/index.json: this folder was prepared by an older version"):
        prepare_dataset(src, str(old), **QUIET)
    with pytest.raises(ValueError, match=r"old/index.json: a shard folder written by an older version.*"
                                         r"jobs.prepare --src \.\.\. --dst NEW_FOLDER"):
        read_index(str(old))


def test_sidecar_offsets_point_at_each_sample(tmp_path):
    src, dst = str(tmp_path / "raw"), str(tmp_path / "shards")
    make_sample(src, **TINY)
    prepare_dataset(src, dst, splits=["train"], **QUIET)
    for shard in read_index(dst).splits["train"].shards:
        meta = json.loads(open(sidecar_url(dst, shard.name)).read())
        data = open(f"{dst}/{shard.name}", "rb").read()
        assert len(meta["offsets"]) == shard.samples == meta["samples"]
        assert data[meta["end"]:] == b"\0" * (len(data) - meta["end"]) and meta["end"] < len(data)
        with open(f"{dst}/{shard.name}", "rb") as f:
            got = [(offset, key) for _, offset, key, _ in read_samples(f, shard.name)]
        assert [offset for offset, _ in got] == meta["offsets"]
        for offset, key in got:  # a reader can start at any sample from its offset alone
            with open(f"{dst}/{shard.name}", "rb") as f:
                assert next(read_samples(f, shard.name, offset=offset))[2] == key


def test_max_side_shrinks_and_reencodes(tmp_path):
    src, dst = str(tmp_path / "raw"), str(tmp_path / "shards")
    make_sample(src, **TINY)
    summary = prepare_dataset(src, dst, splits=["val"], options=StoreOptions(max_side=100, quality=80), **QUIET)
    assert summary["reencoded"]["max_side"] >= 1
    assert read_index(dst).extra["storage"] == {"version": "store/1", "max_side": 100, "quality": 80}
    layout, fs = ImageNetLayout(src), fsspec.filesystem("file")
    boxes = {s.key: s.boxes[0] for s in layout.samples("val")}
    for shard in read_index(dst).splits["val"].shards:
        members = dict(_members(fs, f"{dst}/{shard.name}"))
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            meta, image = json.loads(data), members[name.replace(".json", ".jpg")]
            header = jpeg_header(image)
            assert (header.width, header.height) == (meta["width"], meta["height"]) and max(header.width,
                                                                                              header.height) <= 100
            sx = meta["width"] / meta["source_width"]
            assert ("max_side" in meta["reencoded"]) == (max(meta["source_width"], meta["source_height"]) > 100)
            assert meta["boxes"][0]["xmax"] == round(boxes[meta["key"]].xmax * sx)  # boxes in stored pixels


def test_cli_arguments():
    from jobs.prepare import parse_args

    args = parse_args(["--src", "a", "--dst", "b", "--splits", "val,test", "--shard-size", "7"])
    assert args.splits == ["val", "test"] and args.shard_size == 7
    assert args.options == StoreOptions(max_side=None, quality=90)
    assert parse_args(["--src", "a", "--dst", "b", "--max-side", "400", "--quality", "85"]).options == \
        StoreOptions(400, 85)
    for bad in (["--splits", "train,bogus"], ["--max-side", "8"], ["--quality", "101"]):
        with pytest.raises(SystemExit):
            parse_args(["--src", "a", "--dst", "b", *bad])


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
