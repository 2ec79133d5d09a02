"""Raw shard samples -> a batch: decode, augment with randomness seeded per sample (or per batch), labels, and
the corrupt-image accounting (skipped and reported; more than `max_corrupt_fraction` stops the run).

Yields {"image": uint8 [b, 3, H, W], "label": int64 [b], "key": list[str], "corrupt": list[str]}; test samples
(no `cls` member) get label -1.
"""
from __future__ import annotations

from typing import Callable

import torch

from data.decode import CorruptImageError, decode_rgb
from data.reader import IMAGE_EXTS, RawSample
from data.shards import ShardFormatError

MIN_SAMPLES_FOR_CORRUPT_CHECK = 50
EXAMPLES = 5


class CorruptDataError(RuntimeError):
    """Too many images of a stream failed to decode."""


def sample_label(members: dict[str, bytes], key: str, shard_url: str) -> int:
    if "cls" not in members:
        return -1
    try:
        return int(members["cls"])
    except ValueError:
        raise ShardFormatError(f"{shard_url}: sample {key!r} has class {members['cls'][:20]!r}, "
                               "not an integer") from None


def image_member(members: dict[str, bytes], key: str, shard_url: str) -> bytes:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise ShardFormatError(f"{shard_url}: sample {key!r} has no image member "
                               f"(members: {', '.join(sorted(members))})")
    return members[ext]


class BatchMaker:
    """Decodes and transforms samples into batches for one loader worker, counting corrupt images.

    `where` names the stream in errors (URL, split, rank). Counts cover what this maker decoded since `reset`.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], image_size: int | None,
                 max_corrupt_fraction: float, where: str,
                 decode: Callable[[bytes, str], torch.Tensor] = decode_rgb) -> None:
        self.transform, self.image_size, self.decode = transform, image_size, decode
        self.max_corrupt_fraction, self.where = max_corrupt_fraction, where
        self.reset()

    def reset(self) -> None:
        self.seen, self.corrupt, self.examples = 0, 0, []

    def make(self, raw: list[RawSample], seeds: list[int] | int, positions: list[int] | None = None) -> dict:
        """A batch of `raw`; augmentation draws from torch's RNG seeded with seeds[i] before sample i (a list)
        or once with `seeds` before the batch (an int). The caller's RNG state is left as it was. With
        `positions` (one per sample) the batch gets "position": int64 [b], those of the decoded samples."""
        images, labels, keys, corrupt, kept = [], [], [], [], []
        with torch.random.fork_rng(devices=[]):
            if isinstance(seeds, int):
                torch.manual_seed(seeds)
            for i, (key, shard_url, members) in enumerate(raw):
                data = image_member(members, key, shard_url)
                try:
                    image = self.decode(data, key)
                except CorruptImageError as e:
                    corrupt.append(key)
                    if len(self.examples) < EXAMPLES:
                        self.examples.append(f"{key} in {shard_url} ({e.reason})")
                    continue
                if not isinstance(seeds, int):
                    torch.manual_seed(seeds[i])
                images.append(self.transform(image))
                labels.append(sample_label(members, key, shard_url))
                keys.append(key)
                kept.append(i)
        self.seen += len(raw)
        self.corrupt += len(corrupt)
        if self.seen >= MIN_SAMPLES_FOR_CORRUPT_CHECK and self.corrupt > self.max_corrupt_fraction * self.seen:
            self.raise_corrupt()
        side = self.image_size or 0
        image_batch = torch.stack(images) if images else torch.empty((0, 3, side, side), dtype=torch.uint8)
        batch = {"image": image_batch, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                 "corrupt": corrupt}
        if positions is not None:
            batch["position"] = torch.tensor([positions[i] for i in kept], dtype=torch.int64)
        return batch

    def check_all_corrupt(self) -> None:
        """At the end of a small set: every image corrupt is an error even below the check's minimum count."""
        if self.corrupt == self.seen > 0:
            self.raise_corrupt()

    def raise_corrupt(self) -> None:
        raise CorruptDataError(
            f"{self.corrupt} of {self.seen} images decoded by one loader worker of {self.where} were corrupt, more "
            f"than max_corrupt_fraction={self.max_corrupt_fraction}; examples: {'; '.join(self.examples)}. "
            "Run data.shards.verify_shards and re-run jobs.prepare, or raise max_corrupt_fraction.")
