"""Raw shard samples -> a batch: each sample made into a row (crop drawn from its size, decoded at the scale the crop
needs; or its compressed bytes and crop, for decoding on the training device), randomness seeded per sample (or per
batch), labels, and the corrupt-image accounting (skipped and reported; more than `max_corrupt_fraction` stops the
run).

Batches: {"image": uint8 [b, 3, H, W], "label": int64 [b], "key": list[str], "corrupt": list[str]}; in encoded mode
(`data.decode: gpu`) "image" is the b compressed images concatenated, uint8 [total bytes], with "image_offsets":
int64 [b + 1] (image i is bytes offsets[i]:offsets[i+1]) and "crop": int64 [b, 5] (top, left, height, width, flip),
which `data.gpu_decode.device_batch` turns into the normalised batch. Test samples (no `cls` member) get label -1.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import torch

from data.decode import CorruptImageError, JpegHeader, decode_rgb, image_size, jpeg_header
from data.layout import EXAMPLES
from data.reader import IMAGE_EXTS, RawSample
from data.shards import ShardFormatError
from data.transforms import CROP_SCALE, Crop, augment_op, center_crop, decode_crop, sample_crop

MIN_SAMPLES_FOR_CORRUPT_CHECK = 50

Row = torch.Tensor | tuple[bytes, Crop]  # a decoded uint8 image, or (compressed bytes, crop) in encoded mode
BATCH_FIELDS = ("image", "image_offsets", "crop", "label", "key", "corrupt", "position", "step")


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


def _json_size(members: dict[str, bytes]) -> tuple[int, int] | None:
    try:
        meta = json.loads(members["json"])
        width, height = meta["width"], meta["height"]
    except (KeyError, TypeError, ValueError):
        return None
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    return (width, height) if ok else None


def image_dims(data: bytes, key: str, members: dict[str, bytes]) -> tuple[int, int, JpegHeader | None]:
    """(width, height, JPEG header or None) of a sample's image without decoding it: from the JPEG frame header (the
    decode reads it anyway; every image `jobs.prepare` stores is a JPEG), else the sample's json (prepare writes
    width/height), else PIL's header read. CorruptImageError when none of them gives a size."""
    header = jpeg_header(data)
    if header is not None:
        return header.width, header.height, header
    size = _json_size(members) if "json" in members else None
    return (*(size or image_size(data, key)), None)


class CropFirst:
    """A sample -> a row, crop first: the crop is drawn from the image size with torch's default generator (seeded per
    sample by the caller), `sample_crop` for training (RandomResizedCrop + flip's distribution, draw for draw),
    `center_crop` for evaluation. `decode="cpu"`: `decode_crop` (decode at the scale the crop needs, resize the
    region), then RandAugment/TrivialAugment if asked; `decode="gpu"`: the compressed bytes and the crop, unchanged,
    for `data.gpu_decode` (the same sample gets the same crop in both modes)."""

    def __init__(self, image_size: int, train: bool, crop_scale: tuple[float, float] = CROP_SCALE,
                 auto_augment: str | None = None, decode: str = "cpu") -> None:
        self.image_size, self.train, self.crop_scale, self.decode = image_size, train, tuple(crop_scale), decode
        self.augment = augment_op(auto_augment) if train else None
        if decode == "gpu" and self.augment is not None:
            raise ValueError(f"auto_augment={auto_augment!r} runs on decoded images in the loader workers; it needs "
                             "decode='cpu' (or auto_augment=None with decode='gpu')")
        self.encoded = decode == "gpu"

    def crop(self, width: int, height: int) -> Crop:
        if self.train:
            return sample_crop(width, height, self.crop_scale)
        return center_crop(width, height, self.image_size)

    def __call__(self, data: bytes, key: str, members: dict[str, bytes]) -> Row:
        width, height, header = image_dims(data, key, members)
        crop = self.crop(width, height)
        if self.encoded:
            return data, crop
        image = decode_crop(data, crop, self.image_size, key, header)
        return self.augment(image) if self.augment is not None else image


class DecodeThen:
    """A sample -> a row by a full decode, then a transform of the uint8 image (the ten-crop evaluation; the v2
    presets of the previous ShardStream). The transform draws from torch's default generator."""

    encoded = False

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor],
                 decode: Callable[[bytes, str], torch.Tensor] = decode_rgb) -> None:
        self.transform, self.decode = transform, decode

    def __call__(self, data: bytes, key: str, members: dict[str, bytes]) -> Row:
        return self.transform(self.decode(data, key))


class CorruptTally:
    """Images seen and corrupt in one stream (`where` names it in errors), with a few examples; more than
    `max_fraction` corrupt (once 50 were seen) raises CorruptDataError."""

    def __init__(self, max_fraction: float, where: str) -> None:
        self.max_fraction, self.where = max_fraction, where
        self.seen, self.corrupt, self.examples = 0, 0, []

    def add(self, seen: int, corrupt: int, examples: Sequence[str] = ()) -> None:
        self.seen += seen
        self.corrupt += corrupt
        self.examples += list(examples)[:EXAMPLES - len(self.examples)]
        if self.seen >= MIN_SAMPLES_FOR_CORRUPT_CHECK and self.corrupt > self.max_fraction * self.seen:
            self.raise_corrupt()

    def check_all_corrupt(self) -> None:
        """At the end of a small set: every image corrupt is an error even below the check's minimum count."""
        if self.corrupt == self.seen > 0:
            self.raise_corrupt()

    def raise_corrupt(self) -> None:
        raise CorruptDataError(
            f"{self.corrupt} of {self.seen} images of {self.where} were corrupt, more than max_corrupt_fraction="
            f"{self.max_fraction}; examples: {'; '.join(self.examples)}. Run data.shards.verify_shards and re-run "
            "jobs.prepare, or raise max_corrupt_fraction.")


def pack_encoded(rows: list[tuple[bytes, Crop]]) -> dict:
    """The encoded-mode image fields of a batch: bytes concatenated (one copy), their offsets, the crops."""
    offsets = [0]
    for data, _ in rows:
        offsets.append(offsets[-1] + len(data))
    packed = bytearray(offsets[-1])
    for (data, _), start, stop in zip(rows, offsets, offsets[1:]):
        packed[start:stop] = data
    crops = torch.tensor([(*crop[:4], int(crop.flip)) for _, crop in rows], dtype=torch.int64).view(-1, 5)
    return {"image": torch.frombuffer(packed, dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8),
            "image_offsets": torch.tensor(offsets, dtype=torch.int64), "crop": crops}


def join_batches(parts: list[dict]) -> dict:
    """One batch from parts, in order (decoded or encoded alike); "position" and "step" kept when present."""
    if len(parts) == 1:  # one loader worker (or none): nothing to copy
        return {k: v for k, v in parts[0].items() if k in BATCH_FIELDS}
    out: dict = {"label": torch.cat([p["label"] for p in parts]), "key": [k for p in parts for k in p["key"]],
                 "corrupt": [k for p in parts for k in p["corrupt"]], "image": torch.cat([p["image"] for p in parts])}
    if "crop" in parts[0]:
        bases = np.cumsum([0] + [p["image"].numel() for p in parts])
        out["image_offsets"] = torch.cat([p["image_offsets"][:-1] + int(base) for p, base in zip(parts, bases)]
                                         + [torch.tensor([int(bases[-1])])])
        out["crop"] = torch.cat([p["crop"] for p in parts])
    if "position" in parts[0]:
        out["position"] = torch.cat([p["position"] for p in parts])
    if "step" in parts[0]:
        out["step"] = parts[0]["step"]
    return out


class BatchMaker:
    """Makes rows of samples into batches for one loader worker, counting corrupt images (`tally`).

    `rows` turns (image bytes, key, members) into a row (CropFirst, DecodeThen); `where` names the stream in errors.
    """

    def __init__(self, rows: Callable[[bytes, str, dict], Row], image_size: int | None, max_corrupt_fraction: float,
                 where: str) -> None:
        self.rows, self.image_size = rows, image_size
        self.encoded = bool(getattr(rows, "encoded", False))
        self.tally = CorruptTally(max_corrupt_fraction, f"{where}, one loader worker")

    def make(self, raw: list[RawSample], seeds: list[int] | int | None = None,
             positions: list[int] | None = None) -> dict:
        """A batch of `raw`; randomness comes from torch's default generator seeded with seeds[i] before sample i (a
        list), once with `seeds` before the batch (an int), or not at all (None). The caller's RNG state is left as
        it was. With `positions` (one per sample) the batch gets "position": int64 [b], those of the kept samples."""
        rows, labels, keys, corrupt, kept, examples = [], [], [], [], [], []
        with torch.random.fork_rng(devices=[]):
            if isinstance(seeds, int):
                torch.default_generator.manual_seed(seeds)
            for i, (key, shard_url, members) in enumerate(raw):
                if isinstance(seeds, list):
                    torch.default_generator.manual_seed(seeds[i])  # CPU only: torch.manual_seed costs 100x more
                try:
                    rows.append(self.rows(image_member(members, key, shard_url), key, members))
                except CorruptImageError as e:
                    corrupt.append(key)
                    examples.append(f"{key} in {shard_url} ({e.reason})")
                    continue
                labels.append(sample_label(members, key, shard_url))
                keys.append(key)
                kept.append(i)
        self.tally.add(len(raw), len(corrupt), examples)
        batch = pack_encoded(rows) if self.encoded else {"image": self._stack(rows)}
        batch.update(label=torch.tensor(labels, dtype=torch.int64), key=keys, corrupt=corrupt)
        if positions is not None:
            batch["position"] = torch.tensor([positions[i] for i in kept], dtype=torch.int64)
        return batch

    def _stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        side = self.image_size or 0
        return torch.stack(rows) if rows else torch.empty((0, 3, side, side), dtype=torch.uint8)

    def check_all_corrupt(self) -> None:
        self.tally.check_all_corrupt()
