"""The training order as pure functions: windows, stream ranges, rank and loader-worker shares, the fingerprint,
StreamOptions and the data section of the config."""
import itertools

import pytest

from data.index import DatasetIndex, ShardInfo, SplitIndex
from data.options import StreamOptions
from data.order import (EpochShards, OrderChangedError, TrainOrder, check_same_order, check_world,
                        loader_worker_streams, order_fingerprint, pieces_of, rank_streams, window_samples,
                        window_starts)
from distributed.config import ConfigError, load_config

SIZES = [17, 3, 25, 0, 11, 30, 14]  # 100 samples, uneven shards and an empty one


def index_of(sizes, sha="x", sample_bytes=1000) -> DatasetIndex:
    shards = [ShardInfo(f"train/train-{i:06d}.tar", n, n * sample_bytes, f"{sha}{i}") for i, n in enumerate(sizes)]
    return DatasetIndex(["n0"], ["a"], {"train": SplitIndex(shards, sum(sizes))})


def order_of(seed=0, global_batch=6, mb=None, window=4, sizes=SIZES, sha="x") -> TrainOrder:
    mb = mb if mb is not None else window * 2 * global_batch * 1000 / 2 ** 20  # a budget giving `window`
    return TrainOrder.from_index(index_of(sizes, sha), seed, global_batch, mb)


def test_window_starts_ramp_then_full_windows_cover_the_stream():
    assert window_starts(16, 4) == [0, 1, 3, 7, 11, 15]  # sizes 1, 2, 4, 4, 4, 1
    assert window_starts(100, 16) == [0, 2, 6, 14, 30, 46, 62, 78, 94]
    assert window_starts(3, 1) == [0, 1, 2] and window_starts(0, 5) == []
    for steps, window in itertools.product([1, 7, 50], [1, 3, 8, 64]):
        starts = window_starts(steps, window)
        sizes = [b - a for a, b in zip(starts, starts[1:] + [steps])]
        assert starts[0] == 0 and all(0 < s <= window for s in sizes)


def test_window_size_comes_from_the_whole_jobs_budget():
    # 4096 MiB over 2 windows x 1024 streams of 110 KB samples: 18 samples, whatever the world size
    assert window_samples(4096, 1024, 110 * 1024, 1251) == 18
    assert window_samples(1, 1024, 110 * 1024, 1251) == 1  # never below one sample
    assert window_samples(1e6, 4, 100, 25) == 25  # never beyond the stream
    assert order_of(window=4).window == 4


def test_every_epoch_is_a_permutation_of_its_first_s_times_g_positions():
    order = order_of()
    assert (order.samples, order.steps_per_epoch) == (100, 16)
    for epoch in range(3):
        batches = [order.batch_positions(epoch, k) for k in range(order.steps_per_epoch)]
        flat = [p for b in batches for p in b]
        assert sorted(flat) == list(range(96))
        for c in range(6):  # stream c serves its own contiguous range, in windows
            mine = [b[c] for b in batches]
            assert sorted(mine) == list(range(c * 16, (c + 1) * 16))
            for w, start in enumerate(order.windows):
                steps = order.window_range(w)
                assert sorted(mine[steps.start:steps.stop]) == list(range(c * 16 + start, c * 16 + steps.stop))
    assert order.batch_positions(0, 5) != order.batch_positions(1, 5)
    assert order.epoch_shards(0).shards != order.epoch_shards(1).shards


def test_epoch_shards_pieces_match_the_linear_scan():
    shards = order_of().epoch_shards(2)
    for a in range(0, 101, 3):
        for b in range(a, 101, 7):
            assert shards.pieces(a, b) == pieces_of(shards.shards, a, b)
    assert EpochShards([]).pieces(0, 0) == []


def test_rank_and_loader_worker_shares_partition_the_streams():
    for world in (1, 2, 3, 6):
        ranks = [rank_streams(6, r, world) for r in range(world)]
        assert [c for r in ranks for c in r] == list(range(6))
        for loader_workers in (1, 2, 4):
            shares = [loader_worker_streams(ranks[0], lw, loader_workers) for lw in range(loader_workers)]
            assert [c for s in shares for c in s] == list(ranks[0])
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_world_size_that_does_not_divide_g_names_the_valid_counts():
    with pytest.raises(ValueError, match=r"global_batch_size=1024 cannot be split evenly over 3 ranks; valid rank "
                                         r"counts: 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024"):
        check_world(1024, 3)
    with pytest.raises(ValueError, match="0 <= rank < world=2"):
        rank_streams(6, 2, 2)
    with pytest.raises(ValueError, match="fewer than data.global_batch_size=200"):
        order_of(global_batch=200)


def test_fingerprint_names_every_setting_that_changes_the_order():
    base = order_fingerprint(order_of(), 1.0)
    check_same_order(base, order_fingerprint(order_of(), 1.0))  # same settings: accepted
    changed = {
        "seed": order_fingerprint(order_of(seed=1), 1.0),
        "global_batch_size": order_fingerprint(order_of(global_batch=4), 1.0),
        "shuffle_buffer_mb": order_fingerprint(order_of(), 2.0),
        "window_samples": order_fingerprint(order_of(window=8), 1.0),
        "index": order_fingerprint(order_of(sha="y"), 1.0),
    }
    for key, fp in changed.items():
        with pytest.raises(OrderChangedError, match=rf"{key}: {base[key]!r} -> {fp[key]!r}"):
            check_same_order(base, fp)


def test_stream_options_check_their_values_and_come_from_the_config():
    with pytest.raises(ValueError, match="global_batch_size must be > 0"):
        StreamOptions("x", global_batch_size=0)
    with pytest.raises(ValueError, match="crop_scale"):
        StreamOptions("x", crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="decode='dali'; valid: 'cpu', 'gpu'"):
        StreamOptions("x", decode="dali")
    cfg = load_config("configs/demo.yaml", ["data.global_batch_size=32", "data.shuffle_buffer_mb=8"])
    opts = StreamOptions.from_config(cfg.data, seed=cfg.run.seed)
    assert (opts.url, opts.global_batch_size, opts.shuffle_buffer_mb, opts.crop_scale) == \
        ("demo_data/shards", 32, 8.0, (0.35, 1.0))


@pytest.mark.parametrize("override, fragment", [
    ("data.global_batch_size=0", "'data.global_batch_size' must be > 0"),
    ("data.shuffle_buffer_mb=0", "'data.shuffle_buffer_mb' must be > 0"),
    ("data.loader_workers=-1", "'data.loader_workers' must be >= 0"),
    ("data.crop_scale=[0.5]", "'data.crop_scale' must be [low, high]"),
    ("data.max_corrupt_fraction=2", "'data.max_corrupt_fraction' must lie in [0, 1]"),
    ("data.decode=dali", "'data.decode' is 'dali'; valid: 'cpu', 'gpu'"),
])
def test_data_config_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert fragment in str(e.value)
