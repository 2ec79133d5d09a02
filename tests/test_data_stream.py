"""ShardStream: exact partition over ranks and loader workers, resume, determinism, corrupt and flaky input."""
import pytest
import torch
from torch.utils.data import DataLoader

import data.reader as reader
import data.storage as storage
from data.shards import ShardIntegrityError
from data.stream import CorruptDataError, ShardReadError, ShardStream, build_loader
from data.transforms import train_transform
from tests.shard_data import build


def resize8(img: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(img[None].float(), size=(8, 8)).to(torch.uint8)[0]


def batches(url, split="train", *, loader=False, **kw) -> list[dict]:
    kw = {"batch_size": 4, "train": True, "transform": resize8, "shuffle_buffer": 5, **kw}
    ds = ShardStream(url, split, **kw)
    if loader:
        return list(DataLoader(ds, batch_size=None, num_workers=kw.get("num_workers", 0)))
    return list(ds)


def keys_of(bs: list[dict]) -> list[str]:
    return [k for b in bs for k in b["key"]]


SIZES = [7, 3, 10, 0, 4, 8]  # 32 samples, uneven shards and an empty one


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("shards"))
    return url, build(url, SIZES)


def test_two_ranks_two_workers_see_every_sample_once(dataset):
    url, keys = dataset
    seen, lengths = [], []
    for rank in range(2):
        ds = ShardStream(url, "train", batch_size=4, rank=rank, world_size=2, train=True, transform=resize8,
                         num_workers=2, shuffle_buffer=5)
        out = list(DataLoader(ds, batch_size=None, num_workers=2))
        lengths.append((len(ds), len(out)))
        assert all(b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.uint8 for b in out)
        assert all(b["label"].dtype == torch.int64 and b["corrupt"] == [] for b in out)
        assert all(int(k[1:]) % 5 == lab for b in out for k, lab in zip(b["key"], b["label"].tolist()))
        seen += keys_of(out)
    assert lengths == [(4, 4), (4, 4)]
    assert sorted(seen) == keys


def test_in_process_iteration_equals_the_dataloader(dataset):
    url, _ = dataset
    kw = dict(rank=1, world_size=2, num_workers=2, epoch=3)
    a, b = batches(url, **kw), batches(url, loader=True, **kw)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


@pytest.mark.parametrize("sizes,world,workers", [([5, 9, 2, 11], 2, 2), ([1, 1, 13, 6, 4], 3, 3), ([27], 2, 1)])
def test_uneven_shards_equal_batches_no_duplicates(tmp_path, sizes, world, workers):
    url = str(tmp_path)
    keys = build(url, sizes)
    per_rank = [batches(url, rank=r, world_size=world, num_workers=workers, seed=4) for r in range(world)]
    quota = sum(sizes) // world
    assert {len(b) for b in per_rank} == {quota // 4}
    seen = [k for bs in per_rank for k in keys_of(bs)]
    assert len(seen) == len(set(seen)) == world * (quota // 4) * 4 and set(seen) <= set(keys)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_mid_epoch_is_exact_with_two_workers(dataset, k):
    url, _ = dataset
    kw = dict(rank=0, world_size=1, num_workers=2, epoch=1, seed=5,
              transform=train_transform(8))  # random crops and flips: resumed pixels must match too
    full = batches(url, loader=True, **kw)
    ds = ShardStream(url, "train", batch_size=4, train=True, shuffle_buffer=5, start_batch=k, **kw)
    assert len(ds) == len(full) - k == 8 - k
    rest = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert keys_of(rest) == keys_of(full[k:])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[k:]))


def test_order_is_deterministic_per_seed_and_epoch(dataset):
    url, _ = dataset
    order = lambda **kw: keys_of(batches(url, num_workers=2, **kw))  # noqa: E731
    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    assert sorted(order(seed=1, epoch=1)) == sorted(order(seed=1, epoch=0))


def test_evaluation_covers_every_sample_exactly_once(tmp_path):
    url = str(tmp_path)
    keys = build(url, [5, 9, 2, 11], split="val")  # 27 samples
    per_rank = [batches(url, "val", train=False, rank=r, world_size=3, num_workers=2) for r in range(3)]
    per_rank += [batches(url, "val", train=False, rank=r, world_size=4, num_workers=2) for r in range(4)]
    for ranks in (per_rank[:3], per_rank[3:]):
        sizes = [len(keys_of(b)) for b in ranks]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 27
        assert sorted(k for b in ranks for k in keys_of(b)) == keys
    single = batches(url, "val", train=False, num_workers=3)
    assert sorted(keys_of(single)) == keys and [len(b["key"]) for b in single][-1] == 3  # 27 = 6 x 4 + 3
    assert len(ShardStream(url, "val", batch_size=4, train=False, transform=resize8, num_workers=3)) == 7
    assert keys_of(batches(url, "val", train=False, num_workers=1)) == keys  # one worker, no shuffle: index order


def test_test_split_has_label_minus_one(tmp_path):
    url = str(tmp_path)
    build(url, [6], split="test", labels=False)
    out = batches(url, "test", train=False, batch_size=4)
    assert [b["label"].tolist() for b in out] == [[-1] * 4, [-1] * 2]


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    url = str(tmp_path)
    keys = build(url, [10, 10], corrupt={3, 15})
    out = batches(url, max_corrupt_fraction=0.5, shuffle_buffer=1)
    corrupt = [k for b in out for k in b["corrupt"]]
    assert sorted(corrupt) == ["s0003", "s0015"]
    assert sorted(keys_of(out) + corrupt) == keys
    assert sorted(len(b["key"]) for b in out) == [3, 3, 4, 4, 4]  # never refilled from later samples
    assert all(b["image"].shape[0] == len(b["key"]) == len(b["label"]) for b in out)


def test_too_many_corrupt_images_raise_with_examples(tmp_path):
    url = str(tmp_path)
    build(url, [30, 30], corrupt=set(range(0, 60, 6)))
    with pytest.raises(CorruptDataError, match=r"corrupt.*s0\d+ in .*train-00000\d.tar"):
        batches(url, batch_size=10, shuffle_buffer=1)
    tiny = str(tmp_path / "tiny")
    build(tiny, [4], corrupt={0, 1, 2, 3})
    with pytest.raises(CorruptDataError, match="4 of 4"):
        batches(tiny, batch_size=2, train=False)


def test_shard_size_is_checked_against_the_index(tmp_path):
    url = str(tmp_path)
    build(url, [8, 8])
    with open(tmp_path / "train/train-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardIntegrityError, match=r"train-000001.tar: \d+ bytes, _index.json says"):
        batches(url, shuffle_buffer=1)


class FlakyFile:
    """Raises ConnectionError once on the n-th read, like a dropped connection mid-shard."""

    def __init__(self, f, fail_at: int, state: dict):
        self.f, self.fail_at, self.state = f, fail_at, state

    def read(self, n=-1):
        self.state["reads"] += 1
        if self.state["reads"] == self.fail_at:
            raise ConnectionError("connection reset by peer")
        return self.f.read(n)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def test_transient_errors_are_retried_from_the_last_boundary(dataset, monkeypatch):
    url, _ = dataset
    expected = keys_of(batches(url, num_workers=2, seed=9))
    monkeypatch.setattr(storage, "BASE_DELAY_S", 0)
    real = reader._open_shard
    state = {"reads": 0, "opens": 0}

    def flaky_open(fs, path):
        state["opens"] += 1
        if state["opens"] == 1:
            raise OSError("503 Slow Down")
        return FlakyFile(real(fs, path), 25, state)

    monkeypatch.setattr(reader, "_open_shard", flaky_open)
    assert keys_of(batches(url, num_workers=2, seed=9)) == expected
    assert state["reads"] > 25


def test_persistent_errors_name_the_shard(dataset, monkeypatch):
    url, _ = dataset
    monkeypatch.setattr(storage, "BASE_DELAY_S", 0)

    def broken(fs, path):
        raise OSError("connection refused")

    monkeypatch.setattr(reader, "_open_shard", broken)
    with pytest.raises(ShardReadError, match=r"train-00000\d.tar: read failed 4 times in a row.*connection refused"):
        batches(url)


def test_missing_shard_and_short_shard(tmp_path):
    url = str(tmp_path)
    build(url, [6, 6])
    (tmp_path / "train/train-000001.tar").unlink()
    with pytest.raises(ShardReadError, match="train-000001.tar: FileNotFoundError"):
        batches(url, shuffle_buffer=1)


def test_tiny_readahead_buffer_still_streams(dataset):
    url, keys = dataset
    out = keys_of(batches(url, readahead_bytes=1, train=False))
    assert out == keys


def test_argument_errors(dataset):
    url, _ = dataset
    with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
        ShardStream(url, "train", batch_size=20, world_size=2, train=True, transform=resize8)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        ShardStream(url, "train", batch_size=2, rank=2, world_size=2, train=True, transform=resize8)
    with pytest.raises(ValueError, match="CUDA"):
        ShardStream(url, "train", batch_size=2, train=True, transform=resize8, num_workers=2, decode_device="cuda")


def test_build_loader_presets(dataset):
    url, _ = dataset
    loader = build_loader(url, "train", batch_size=4, rank=0, world_size=2, train=True, image_size=16,
                          num_workers=0, seed=0, epoch=0, auto_augment="trivialaugment")
    out = list(loader)
    assert len(loader) == len(out) == 4 and out[0]["image"].shape == (4, 3, 16, 16)
    loader = build_loader(url, "train", batch_size=5, rank=0, world_size=1, train=False, image_size=16,
                          num_workers=2, seed=0, epoch=0, prefetch_factor=2)
    assert sum(len(b["key"]) for b in loader) == 32 and len(loader) == 7


def test_streams_from_s3_with_loader_workers(tmp_path, s3_bucket):
    url = f"s3://{s3_bucket}/shards"
    keys = build(url, [7, 3, 10, 4])
    out = batches(url, loader=True, num_workers=2, world_size=1, train=False)
    assert keys_of(out) != [] and sorted(keys_of(out)) == keys
    train = batches(url, loader=True, num_workers=2, rank=1, world_size=2)
    assert len(train) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_in_the_loader(dataset):
    url, keys = dataset
    loader = build_loader(url, "train", batch_size=4, rank=0, world_size=1, train=False, image_size=8,
                          num_workers=0, seed=0, epoch=0, decode_device="cuda")
    out = list(loader)
    assert out[0]["image"].is_cuda and sorted(keys_of(out)) == keys
