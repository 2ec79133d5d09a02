"""TrainLoader at the loader level (no Ray): batches that do not depend on the world size or the loader-worker
count, resume at another shape with every sample of the epoch exactly once, bit-identical to an uninterrupted
run, resume cost of about one window per stream, persistent loader workers, corrupt and flaky input, S3."""
import collections
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import data.reader as reader_module
import data.storage as storage
from data.batch import CorruptDataError
from data.decode import decode_rgb
from data.index import IndexChangedError, ShardIndexError, read_index, read_shard_offsets, sidecar_url
from data.loader import TrainLoader, eval_loader, train_fingerprint
from data.options import StreamOptions
from data.order import OrderChangedError, TrainOrder, check_same_order, seed_of
from data.reader import iter_raw_samples
from data.shards import ShardIntegrityError, scan_offsets
from data.storage import fs_and_root
from data.transforms import center_crop, decode_crop, sample_crop, ten_crop_transform
from tests.shard_data import build, jpeg

SIZES = [17, 3, 25, 0, 11, 30, 14]  # 100 samples: G=6 gives S=16 steps, 96 samples an epoch, 4 dropped
G, WINDOW = 6, 4  # windows of 1, 2, 4, 4, 4, 1 steps


def options(url: str, loader_workers: int = 0, window: int = WINDOW, **kw) -> StreamOptions:
    """Options whose shuffle budget gives `window`-sample windows for this index."""
    index = read_index(url).split("train")
    mean = sum(s.bytes for s in index.shards) / index.samples
    mb = window * 2 * G * mean / 2 ** 20 * 1.001
    return StreamOptions(url, image_size=8, global_batch_size=G, loader_workers=loader_workers, shuffle_buffer_mb=mb,
                         seed=3, **kw)


def run(url: str, world: int, loader_workers: int, epoch: int = 0, start: int = 0, stop: int | None = None,
        **kw) -> list[dict]:
    """Steps [start, stop) at a shape: per step, the ranks' batches concatenated in rank order."""
    loaders = [TrainLoader(options(url, loader_workers, **kw), r, world) for r in range(world)]
    passes = [ld.epoch(epoch, start) for ld in loaders]
    out = []
    try:
        for _ in range(start, stop if stop is not None else loaders[0].steps_per_epoch):
            parts = [next(p) for p in passes]
            out.append({"key": [k for b in parts for k in b["key"]], "image": torch.cat([b["image"] for b in parts]),
                        "label": torch.cat([b["label"] for b in parts]), "corrupt": [k for b in parts for k in
                                                                                      b["corrupt"]]})
    finally:
        for ld in loaders:
            ld.close()
    return out


def epoch_keys(url: str, epoch: int) -> list[str]:
    """The samples of an epoch: the first S x G of the epoch's shard order (keys are s<index position>)."""
    index = read_index(url).split("train")
    first, at = {}, 0
    for s in index.shards:
        first[s.name], at = at, at + s.samples
    order = TrainOrder(tuple(index.shards), 3, G, WINDOW)
    keys = [f"s{first[s.name] + i:04d}" for s in order.epoch_shards(epoch).shards for i in range(s.samples)]
    return keys[:order.steps_per_epoch * G]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and
                                    torch.equal(x["label"], y["label"]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("shards"))
    build(url, SIZES, sidecars=True)
    return url


@pytest.fixture(scope="module")
def reference(dataset):
    """Epoch 1 on one rank in-process: the order every other shape must reproduce."""
    return run(dataset, 1, 0, epoch=1)


def test_the_reference_epoch_is_the_epochs_sample_set(dataset, reference):
    assert len(reference) == 16 and all(len(b["key"]) == G and b["image"].shape == (G, 3, 8, 8) for b in reference)
    assert sorted(k for b in reference for k in b["key"]) == sorted(epoch_keys(dataset, 1))
    assert all(int(k[1:]) % 5 == lab for b in reference for k, lab in zip(b["key"], b["label"].tolist()))


@pytest.mark.parametrize("world, loader_workers", [(2, 2), (3, 4), (6, 1)])
def test_batches_do_not_depend_on_ranks_or_loader_workers(dataset, reference, world, loader_workers):
    assert same(run(dataset, world, loader_workers, epoch=1), reference)  # keys, order, labels, pixels


@pytest.mark.parametrize("before, after, k", [((2, 2), (1, 1), 5), ((2, 1), (3, 2), 9), ((1, 4), (1, 2), 2),
                                              ((1, 2), (2, 3), 13)])
def test_resume_at_another_shape_sees_every_sample_once(dataset, reference, before, after, k):
    first = run(dataset, *before, epoch=1, stop=k)
    rest = run(dataset, *after, epoch=1, start=k)
    seen = collections.Counter(key for b in first + rest for key in b["key"])
    assert seen == collections.Counter(epoch_keys(dataset, 1))  # none twice, none lost
    assert same(first + rest, reference)  # and bit-identical to the uninterrupted epoch


def test_loader_workers_persist_across_epochs(dataset):
    loader = TrainLoader(options(dataset, 2), 0, 1)
    try:
        pids, orders = [], []
        for epoch, start in [(0, 0), (1, 0), (1, 11)]:
            keys = [k for b in loader.epoch(epoch, start) for k in b["key"]]
            pids.append(sorted(s["pid"] for s in loader.read_stats.values()))
            orders.append(keys)
        assert len(set(map(tuple, pids))) == 1 and len(pids[0]) == 2  # the same two processes served every pass
        assert sorted(orders[0]) == sorted(epoch_keys(dataset, 0)) and orders[0] != orders[1]
        assert orders[2] == orders[1][11 * G:]
        stopped = loader.epoch(0, 0)
        next(stopped)  # a pass left unfinished (a stop mid-epoch) does not disturb the next one
        assert [k for b in loader.epoch(1, 11) for k in b["key"]] == orders[2]
    finally:
        loader.close()


class CountingFS:
    """Wraps a filesystem and counts ranged reads and their bytes, to check what the reader reports."""

    def __init__(self, fs):
        self.fs, self.ranges, self.bytes = fs, 0, 0

    def cat_file(self, path, start=None, end=None, **kw):
        data = self.fs.cat_file(path, start=start, end=end, **kw)
        if start is not None and not path.endswith(".json"):
            self.ranges += 1
            self.bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_resume_near_the_end_reads_about_one_window_per_stream(dataset, monkeypatch):
    counting = []

    def counted(url):
        fs, root = fs_and_root(url)
        counting.append(CountingFS(fs))
        return counting[-1], root

    monkeypatch.setattr(reader_module, "fs_and_root", counted)
    loader = TrainLoader(options(dataset), 0, 1)
    full = len(list(loader.epoch(1, 0)))
    whole = loader.io_totals()
    assert full == 16 and whole["samples"] == 96 and whole["bytes"] == counting[-1].bytes
    resumed = list(loader.epoch(1, 14))  # step 14 lies in the window of steps 11-14; the last window is 15
    totals = loader.io_totals()
    assert len(resumed) == 2 and totals["samples"] == G * (4 + 1)  # the window holding step 14, then the last
    assert totals["bytes"] == counting[-1].bytes < whole["bytes"] * 6 / 16
    assert counting[-1].ranges <= G * 2 * 2  # per stream and window: one ranged read, two across a shard end


def test_a_changed_budget_is_a_changed_order(dataset):
    a = TrainLoader(options(dataset), 0, 1).fingerprint
    b = train_fingerprint(options(dataset, window=8))
    assert a == train_fingerprint(options(dataset, loader_workers=3))  # loader workers are not part of the order
    with pytest.raises(OrderChangedError, match="shuffle_buffer_mb: .* -> .*window_samples: 4 -> 8"):
        check_same_order(a, b)


def test_shards_without_stored_offsets_are_scanned_once_each(tmp_path, dataset, reference):
    url = str(tmp_path)
    build(url, SIZES)  # no sidecars: an older prepare
    loader = TrainLoader(options(url), 0, 1)
    assert same(list(loader.epoch(1)), reference)
    assert loader.io_totals()["offset_scans"] == sum(1 for n in SIZES if n)


def test_offsets_prepare_stores_match_the_shard(shards):
    fs, root = fs_and_root(shards)
    for info in read_index(shards).split("train").shards:
        stored = read_shard_offsets(fs, root, info.name, info.samples)
        with fs.open(f"{root}/{info.name}", "rb") as f:
            assert (list(stored.starts), stored.end) == scan_offsets(f, info.name)


def test_bad_sidecar_offsets_and_changed_shards_are_refused(tmp_path):
    url = str(tmp_path)
    build(url, [8, 8], sidecars=True)
    side = Path(sidecar_url(url, "train/train-000001.tar"))
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "offsets": meta["offsets"][:5]}))
    with pytest.raises(ShardIndexError, match=f"{side}: 'offsets' must be 8 increasing"):
        list(TrainLoader(options(url, window=1), 0, 1).epoch(0))
    side.write_text(json.dumps(meta))
    with open(tmp_path / "train/train-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardIntegrityError, match=r"train-000000.tar: \d+ bytes, _index.json says"):
        list(TrainLoader(options(url, window=1), 0, 1).epoch(0))


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    url = str(tmp_path)
    build(url, [20, 20], corrupt={3, 15}, sidecars=True)
    out = list(TrainLoader(options(url, max_corrupt_fraction=0.5), 0, 1).epoch(0))
    corrupt = [k for b in out for k in b["corrupt"]]
    assert sorted(corrupt) == ["s0003", "s0015"]
    assert sorted(k for b in out for k in b["key"] + b["corrupt"]) == sorted(epoch_keys(url, 0))
    assert len(out) == 6 and sum(len(b["key"]) for b in out) == 34  # smaller batches, never refilled
    assert all(b["image"].shape[0] == len(b["key"]) == len(b["label"]) == len(b["position"]) for b in out)
    build(str(tmp_path / "bad"), [60], corrupt=set(range(0, 60, 5)), sidecars=True)
    with pytest.raises(CorruptDataError, match=r"of \d+ images .* were corrupt.*s00\d\d in .*train-000000.tar"):
        list(TrainLoader(options(str(tmp_path / "bad")), 0, 1).epoch(0))


class FlakyFS(CountingFS):
    """Every third ranged read fails once with a dropped connection."""

    def cat_file(self, path, start=None, end=None, **kw):
        self.ranges += 1
        if start is not None and self.ranges % 3 == 0:
            raise ConnectionError("connection reset by peer")
        return self.fs.cat_file(path, start=start, end=end, **kw)


def test_transient_read_errors_are_retried(dataset, reference, monkeypatch):
    monkeypatch.setattr(storage, "BASE_DELAY_S", 0)
    monkeypatch.setattr(reader_module, "fs_and_root", lambda url: (FlakyFS(fs_and_root(url)[0]), fs_and_root(url)[1]))
    assert same(list(TrainLoader(options(dataset), 0, 1).epoch(1)), reference)


def test_eval_loader_and_raw_samples_cover_the_split_once(tmp_path):
    url = str(tmp_path)
    keys = build(url, [5, 9, 2, 11], split="val")
    opts = StreamOptions(url, image_size=8, eval_batch_size=4, loader_workers=2)
    assert [k for r in range(3) for b in eval_loader(opts, r, 3) for k in b["key"]] == keys  # index order
    assert [k for r in range(2) for k, _ in iter_raw_samples(url, "val", r, 2)] == keys


def test_eval_loader_decodes_the_centre_crop_first_and_ten_crops(tmp_path):
    url = str(tmp_path)
    keys = build(url, [6, 5], split="val", sidecars=True)
    opts = StreamOptions(url, image_size=8, eval_batch_size=4, loader_workers=0)
    batches = list(eval_loader(opts, 0, 1))
    images = torch.cat([b["image"] for b in batches])
    expected = [decode_crop(jpeg(i), center_crop(*Image.open(io.BytesIO(jpeg(i))).size, 8), 8) for i in range(11)]
    assert [k for b in batches for k in b["key"]] == keys and torch.equal(images, torch.stack(expected))
    ten = list(eval_loader(opts, 0, 1, ten_crop=True))
    assert [b["image"].shape for b in ten] == [(4, 10, 3, 8, 8)] * 2 + [(3, 10, 3, 8, 8)]
    assert torch.equal(ten[0]["image"][1], ten_crop_transform(8)(decode_rgb(jpeg(1))))


def test_each_sample_gets_the_crop_its_position_seeds(dataset, reference):
    """The CPU path: the crop drawn from the image's size with the generator seeded by (seed, epoch, position),
    then decode_crop; so the same sample at the same place gets the same pixels on any shape."""
    batch = next(TrainLoader(options(dataset), 0, 1).epoch(1, 3))
    for key, position, image in zip(batch["key"], batch["position"].tolist(), batch["image"]):
        data = jpeg(int(key[1:]))
        generator = torch.Generator().manual_seed(seed_of("augment", 3, 1, position))
        crop = sample_crop(*Image.open(io.BytesIO(data)).size, generator=generator)
        assert torch.equal(image, decode_crop(data, crop, 8))
    assert same([{k: batch[k] for k in ("key", "image", "label")}], reference[3:4])


def test_auto_augment_applies_after_the_crop_and_keeps_shape_independence(dataset, reference):
    plain = run(dataset, 1, 0, epoch=1, stop=3)
    augmented = run(dataset, 1, 0, epoch=1, stop=3, auto_augment="trivialaugment")
    assert same(plain, reference[:3]) and not same(augmented, plain)
    assert same(run(dataset, 2, 1, epoch=1, stop=3, auto_augment="trivialaugment"), augmented)


def test_a_changed_index_stops_the_loader_at_the_next_epoch(tmp_path):
    url = str(tmp_path)
    build(url, [20, 20], sidecars=True)
    loader = TrainLoader(options(url), 0, 1)
    assert len(list(loader.epoch(0))) == 6
    build(url, [20, 21], sidecars=True)  # jobs.prepare re-run into the folder with other sources
    with pytest.raises(IndexChangedError, match=r"_index.json: split 'train' changed under a running job"):
        next(loader.epoch(1))


def test_resume_from_s3_at_another_shape(s3_bucket, reference):
    url = f"s3://{s3_bucket}/shards"
    build(url, SIZES, sidecars=True)
    first = run(url, 2, 2, epoch=1, stop=6)
    rest = run(url, 1, 1, epoch=1, start=6)
    assert same(first + rest, reference)
