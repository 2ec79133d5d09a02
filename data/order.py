"""The training order: which samples form global batch k of an epoch, as a pure function of the index, the seed,
the epoch, the global batch G and the shuffle window; never of the number of ranks or loader workers.

It follows MosaicML streaming's canonical partitions ("elastic determinism"), with the global batch as the
partition count (docs/fault_tolerance.md, "The training order", draws it):

- Epoch order: the train split's shards shuffled with a generator seeded by (seed, epoch), concatenated (counts
  from the index, nothing read) and cut to S * G samples, S = N // G the steps per epoch.
- G slot streams: stream c owns positions [c*S, (c+1)*S) of that concatenation and yields one sample per step;
  global batch k = output k of every stream, in stream order. Within its range a stream permutes samples inside
  consecutive windows (a ramp W/8, W/4, W/2, then W: the first batch comes long before a full window is read),
  each window's permutation seeded by (seed, epoch, stream, window).
- Rank r of `world` owns streams [r*G/world, (r+1)*G/world): contiguous data, sequential reads. world must
  divide G. A rank's loader workers split its streams into contiguous shares.

So the ranks' batches of step k, concatenated in rank order, are global batch k for every world size, and the
loader-worker count changes nothing. Augmentation is seeded by (seed, epoch, position) in the same way.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from functools import cached_property

from data.index import DatasetIndex, ShardInfo

ORDER_VERSION = 1  # bump when any function here changes the order for the same inputs
WINDOWS_PER_BUDGET = 2  # the shuffle budget holds two windows per stream: the one served and the next, prefetched


class OrderChangedError(ValueError):
    """A resume would continue an epoch in a different order; the message names each setting, old and new."""


@dataclass(frozen=True)
class Piece:
    """A contiguous run of samples [start, start + count) of one shard."""

    name: str
    bytes: int
    start: int
    count: int


def seed_of(*parts) -> int:
    """A 63-bit seed from any values, stable across processes and Python versions (no hash randomisation)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def pieces_of(shards: list[ShardInfo], start: int, stop: int) -> list[Piece]:
    """The shard pieces covering [start, stop) of the concatenated shard sequence."""
    out, base = [], 0
    for s in shards:
        lo, hi = max(start, base), min(stop, base + s.samples)
        if lo < hi:
            out.append(Piece(s.name, s.bytes, lo - base, hi - lo))
        base += s.samples
        if base >= stop:
            break
    return out


class EpochShards:
    """An epoch's shard sequence with cumulative counts, to find the pieces of a position range by bisection."""

    def __init__(self, shards: list[ShardInfo]) -> None:
        self.shards = shards
        self.ends = list(itertools.accumulate(s.samples for s in shards))

    def pieces(self, start: int, stop: int) -> list[Piece]:
        out, i = [], bisect.bisect_right(self.ends, start)
        while start < stop:
            s = self.shards[i]
            base = self.ends[i] - s.samples
            hi = min(stop, self.ends[i])
            if start < hi:
                out.append(Piece(s.name, s.bytes, start - base, hi - start))
            start, i = max(start, hi), i + 1
        return out


def valid_world_sizes(global_batch: int) -> list[int]:
    return [n for n in range(1, global_batch + 1) if global_batch % n == 0]


def check_world(global_batch: int, world: int) -> None:
    """world must divide G: every rank then takes G / world streams (one sample each per step)."""
    if world < 1 or global_batch % world:
        valid = valid_world_sizes(global_batch)
        shown = ", ".join(map(str, valid[:16])) + (", ..." if len(valid) > 16 else "")
        raise ValueError(f"data.global_batch_size={global_batch} cannot be split evenly over {world} ranks; "
                         f"valid rank counts: {shown}")


def rank_streams(global_batch: int, rank: int, world: int) -> range:
    """The streams of a rank: [rank*G/world, (rank+1)*G/world)."""
    check_world(global_batch, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank}; need 0 <= rank < world={world}")
    per = global_batch // world
    return range(rank * per, (rank + 1) * per)


def loader_worker_streams(streams: range, loader_worker: int, loader_workers: int) -> range:
    """A loader worker's contiguous share of its rank's streams (shares differ by at most one; may be empty)."""
    base, extra = divmod(len(streams), loader_workers)
    lo = streams.start + loader_worker * base + min(loader_worker, extra)
    return range(lo, lo + base + (loader_worker < extra))


def window_samples(shuffle_buffer_mb: float, global_batch: int, mean_sample_bytes: float, steps: int) -> int:
    """Full window size W in samples: the whole job's budget holds two windows of every one of the G streams."""
    fit = int(shuffle_buffer_mb * 2 ** 20 // (WINDOWS_PER_BUDGET * global_batch * max(mean_sample_bytes, 1.0)))
    return max(1, min(fit, steps))


def window_starts(steps: int, window: int) -> list[int]:
    """Starts of a stream's windows over its `steps` outputs: sizes W/8, W/4, W/2 (those >= 1), then W; the last
    window ends at `steps`. A pure function of (steps, window)."""
    sizes = [s for s in (window // 8, window // 4, window // 2) if s >= 1]
    starts, at = [], 0
    while at < steps:
        starts.append(at)
        at += sizes.pop(0) if sizes else window
    return starts


@dataclass(frozen=True)
class TrainOrder:
    """The order of every epoch of a train split; see the module docstring. Positions count samples of the
    epoch's concatenated shard order, 0 <= position < steps_per_epoch * global_batch."""

    shards: tuple[ShardInfo, ...]  # the train split, index order
    seed: int
    global_batch: int
    window: int  # full window W in samples

    @classmethod
    def from_index(cls, index: DatasetIndex, seed: int, global_batch: int, shuffle_buffer_mb: float,
                   url: str = "") -> "TrainOrder":
        split = index.split("train", url)
        if global_batch < 1 or split.samples < global_batch:
            raise ValueError(f"{url}: the train split has {split.samples} samples, fewer than "
                             f"data.global_batch_size={global_batch}; an epoch would have no step")
        mean = sum(s.bytes for s in split.shards) / split.samples
        steps = split.samples // global_batch
        return cls(tuple(split.shards), seed, global_batch,
                   window_samples(shuffle_buffer_mb, global_batch, mean, steps))

    @cached_property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @cached_property
    def steps_per_epoch(self) -> int:
        return self.samples // self.global_batch

    @cached_property
    def windows(self) -> list[int]:
        return window_starts(self.steps_per_epoch, self.window)

    def window_of(self, step: int) -> int:
        return bisect.bisect_right(self.windows, step) - 1

    def window_range(self, window: int) -> range:
        """The steps served by a window."""
        stop = self.windows[window + 1] if window + 1 < len(self.windows) else self.steps_per_epoch
        return range(self.windows[window], stop)

    def epoch_shards(self, epoch: int) -> EpochShards:
        shards = list(self.shards)
        random.Random(seed_of("shards", self.seed, epoch)).shuffle(shards)
        return EpochShards(shards)

    def window_order(self, epoch: int, stream: int, window: int) -> list[int]:
        """Positions of the stream's outputs at the window's steps, in step order (a permutation of its range)."""
        steps = self.window_range(window)
        base = stream * self.steps_per_epoch + steps.start
        order = list(range(base, base + len(steps)))
        random.Random(seed_of("window", self.seed, epoch, stream, window)).shuffle(order)
        return order

    def position(self, epoch: int, stream: int, step: int) -> int:
        window = self.window_of(step)
        return self.window_order(epoch, stream, window)[step - self.windows[window]]

    def batch_positions(self, epoch: int, step: int) -> list[int]:
        """Global batch `step`: one position per stream, in stream order."""
        return [self.position(epoch, c, step) for c in range(self.global_batch)]

    def pieces(self, shards: EpochShards, stream: int, window: int) -> list[Piece]:
        """The shard pieces holding a window of a stream (its range of the epoch's shards `epoch_shards(epoch)`):
        one, or two where the window crosses a shard boundary."""
        steps = self.window_range(window)
        base = stream * self.steps_per_epoch
        return shards.pieces(base + steps.start, base + steps.stop)

    @cached_property
    def index_digest(self) -> str:
        """sha256 of the train split's shard list (names, counts, sizes, sha256): the index's identity."""
        rows = [[s.name, s.samples, s.bytes, s.sha256] for s in self.shards]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def order_fingerprint(order: TrainOrder, shuffle_buffer_mb: float) -> dict:
    """Every setting that defines the order; a resume must find the same dict (see `check_same_order`)."""
    return {"order_version": ORDER_VERSION, "index": order.index_digest, "train_samples": order.samples,
            "seed": order.seed, "global_batch_size": order.global_batch, "shuffle_buffer_mb": shuffle_buffer_mb,
            "window_samples": order.window}


def check_same_order(saved: dict, current: dict) -> None:
    """Raise OrderChangedError naming each setting whose value differs (old -> new); resume must refuse it."""
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k)]
    if changed:
        raise OrderChangedError("the training order would change mid-epoch; the checkpoint was written with other "
                                "settings (" + "; ".join(changed) + "). Restore them, or start a new run")
