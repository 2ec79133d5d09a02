"""StreamOptions: every setting of the data loaders in one frozen dataclass, built once from the run config."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from data.transforms import AUTO_AUGMENT

DECODERS = ("cpu", "gpu")  # gpu: loader workers batch compressed bytes + crops; data.gpu_decode decodes on the device


@dataclass(frozen=True)
class StreamOptions:
    """What the train and eval loaders need; `global_batch_size`, `seed` and `shuffle_buffer_mb` define the
    training order (with the index), the others only how it is produced."""

    url: str  # shards written by `python -m jobs.prepare` (local path, s3://, gs://)
    image_size: int = 224
    global_batch_size: int = 256  # G: samples per optimizer step over all ranks; fixed for a run
    eval_batch_size: int = 128  # per rank
    loader_workers: int = 4  # DataLoader processes per rank; 0 = in the rank's process
    # Raw sample bytes the whole job holds for shuffling and read-ahead (each rank its share, budget / world):
    # two windows per slot stream, so the window in samples = budget / (2 x G x mean sample size).
    shuffle_buffer_mb: float = 1024.0
    seed: int = 0
    auto_augment: str | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range
    max_corrupt_fraction: float = 0.01
    decode: str = "cpu"  # where images are decoded: DECODERS; the order and the crops are the same in both
    prefetch_factor: int = 2  # parts (a loader worker's share of one step) each loader worker keeps ready
    pin_memory: bool | None = None  # None: when CUDA is available

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        positive = ("image_size", "global_batch_size", "eval_batch_size", "shuffle_buffer_mb", "prefetch_factor")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"StreamOptions.{name} must be > 0, got {getattr(self, name)!r}")
        if self.loader_workers < 0:
            raise ValueError(f"StreamOptions.loader_workers must be >= 0, got {self.loader_workers}")
        if not 0 <= self.max_corrupt_fraction <= 1:
            raise ValueError(f"StreamOptions.max_corrupt_fraction must lie in [0, 1], got {self.max_corrupt_fraction}")
        lo, hi = self.crop_scale if len(self.crop_scale) == 2 else (0, -1)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"StreamOptions.crop_scale must be two numbers 0 < low <= high <= 1, got {self.crop_scale}")
        if self.auto_augment not in (None, *AUTO_AUGMENT):
            raise ValueError(f"StreamOptions.auto_augment={self.auto_augment!r}; valid: None, "
                             f"{', '.join(map(repr, AUTO_AUGMENT))}")
        if self.decode not in DECODERS:
            raise ValueError(f"StreamOptions.decode={self.decode!r}; valid: {', '.join(map(repr, DECODERS))}")
        if self.decode == "gpu" and self.auto_augment is not None:
            raise ValueError(f"StreamOptions.auto_augment={self.auto_augment!r} needs decode='cpu': it runs on decoded "
                             "images in the loader workers, which decode='gpu' leaves compressed")

    @classmethod
    def from_config(cls, data: Any, seed: int, **overrides: Any) -> "StreamOptions":
        """From an object with this class's field names as attributes (the run config's `data` section, which
        lacks `seed`: pass the run's). Fields the section lacks keep their defaults; `overrides` win."""
        values = {f.name: getattr(data, f.name) for f in fields(cls) if hasattr(data, f.name)}
        return cls(**{**values, "seed": seed, **overrides})
