"""Tar shards: round trip, refusal of unsafe members, integrity checks, _index.json errors."""
import io
import json
import tarfile

import fsspec
import pytest

from data.index import DatasetIndex, ShardIndexError, ShardInfo, SplitIndex, read_index, write_index
from data.shards import (ShardFormatError, ShardIntegrityError, ShardWriter, file_digest, read_samples,
                         verify_shards)


def _shard(samples) -> bytes:
    buf = io.BytesIO()
    w = ShardWriter(buf)
    for key, members in samples:
        w.write(key, members)
    size, sha = w.close()
    assert size == len(buf.getvalue())
    return buf.getvalue()


SAMPLES = [(f"k{i:03d}", {"jpg": bytes([i]) * (i * 100 + 1), "cls": str(i % 3).encode(), "json": b"{}"})
           for i in range(7)]


def test_round_trip_is_deterministic_and_ordered():
    data = _shard(SAMPLES)
    assert data == _shard(SAMPLES)
    out = list(read_samples(io.BytesIO(data), "s.tar"))
    assert [(k, m) for _, _, k, m in out] == SAMPLES
    assert [i for i, *_ in out] == list(range(7))


def test_skip_and_stop_read_only_what_is_asked():
    data = _shard(SAMPLES)
    out = list(read_samples(io.BytesIO(data), "s.tar", skip_until=2, stop_at=5))
    assert [m is None for *_, m in out] == [True, True, False, False, False]
    assert [k for _, _, k, m in out if m] == ["k002", "k003", "k004"]
    # resume from a sample boundary, as the reader does after a transient error
    idx, offset, key, _ = out[3]
    again = list(read_samples(io.BytesIO(data), "s.tar", offset=offset, first_index=idx, skip_until=idx))
    assert [k for _, _, k, m in again if m] == ["k003", "k004", "k005", "k006"]


def test_long_names_use_pax_and_read_back():
    key = "x" * 150
    assert [k for *_, k, _ in read_samples(io.BytesIO(_shard([(key, {"jpg": b"1"})])), "s.tar")] == [key]


def _raw_tar(*infos: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"abc") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, "/etc/passwd"
    return info, b""


@pytest.mark.parametrize("member,match", [
    (_file("../evil.jpg"), r"s.tar: refused member '../evil.jpg'"),
    (_file("a/../../evil.jpg"), r"refused member 'a/../../evil.jpg'"),
    (_file("/etc/evil.jpg"), r"refused member '/etc/evil.jpg'"),
    (_special("k1.jpg", tarfile.SYMTYPE), r"refused member 'k1.jpg' of tar type b'2'"),
    (_special("k1.jpg", tarfile.LNKTYPE), r"of tar type b'1'"),
    (_special("dir", tarfile.DIRTYPE), r"of tar type b'5'"),
    (_special("k1.jpg", tarfile.FIFOTYPE), r"of tar type b'6'"),
    (_file("noext"), r"has no '<key>.<ext>' name"),
])
def test_unsafe_members_are_refused(member, match):
    data = _raw_tar(_file("k0.jpg"), member)
    with pytest.raises(ShardFormatError, match=match):
        list(read_samples(io.BytesIO(data), "s.tar"))


def test_long_gnu_name_with_dotdot_is_refused():
    with pytest.raises(ShardFormatError, match="refused member"):
        list(read_samples(io.BytesIO(_raw_tar(_file("../" * 60 + "evil.jpg"))), "s.tar"))


def test_garbage_and_truncation_are_format_errors():
    data = _shard(SAMPLES)
    with pytest.raises(ShardFormatError, match="checksum"):
        list(read_samples(io.BytesIO(b"x" * 2048), "s.tar"))
    with pytest.raises(ShardFormatError, match="truncated"):
        list(read_samples(io.BytesIO(data[:1000]), "s.tar"))


def _dataset(tmp_path) -> str:
    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    data = _shard(SAMPLES)
    (root / "train/train-000000.tar").write_bytes(data)
    size, sha = file_digest(fsspec.filesystem("file"), str(root / "train/train-000000.tar"))
    write_index(str(root), DatasetIndex(["n00000001"], ["a"], {"train": SplitIndex(
        [ShardInfo("train/train-000000.tar", len(SAMPLES), size, sha)], len(SAMPLES))}))
    return str(root)


def test_verify_shards_catches_size_and_content_changes(tmp_path):
    url = _dataset(tmp_path)
    assert verify_shards(url) == {"checked": 1, "problems": []}
    path = tmp_path / "ds/train/train-000000.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    assert verify_shards(url, check_sha=False)["problems"] == []
    with pytest.raises(ShardIntegrityError, match=r"train-000000.tar: sha256 .* index says"):
        verify_shards(url)
    path.write_bytes(bytes(data[:-512]))
    assert "bytes, index says" in verify_shards(url, raise_on_error=False)["problems"][0]
    path.unlink()
    assert verify_shards(url, raise_on_error=False)["problems"][0].endswith("missing")


def test_read_index_round_trip_and_errors(tmp_path):
    url = _dataset(tmp_path)
    index = read_index(url)
    assert index.classes == ["n00000001"] and index.num_classes == 1 and index.splits["train"].samples == 7
    with pytest.raises(ShardIndexError, match=r"no split 'val'"):
        index.split("val", url)
    with pytest.raises(ShardIndexError, match=rf"{tmp_path}/nothing/_index.json: not found"):
        read_index(str(tmp_path / "nothing"))
    path = tmp_path / "ds/_index.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ShardIndexError, match="_index.json: not valid JSON"):
        read_index(url)
    for mutate, match in [(lambda d: d.pop("classes"), "missing key 'classes'"),
                          (lambda d: d["splits"]["train"].update(samples=8), "splits.train.samples = 8"),
                          (lambda d: d["splits"]["train"]["shards"][0].update(bytes="9"),
                           r"splits.train.shards\[0\]: key 'bytes' is str"),
                          (lambda d: d.update(format="other/9"), "format 'other/9'")]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(ShardIndexError, match=match):
            read_index(url)
