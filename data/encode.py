"""What `jobs.prepare` stores for an image: the original bytes when they already are a baseline RGB JPEG within the
size limit, else one re-encoding done once at prepare time (so any client decodes every sample the same way).

Re-encoded: non-JPEG files (ImageNet's PNG under a .JPEG name), CMYK and grayscale JPEGs, progressive or other
non-baseline JPEGs, and, with `max_side`, images whose longer side exceeds it (shrunk with PIL's antialiased
Lanczos filter, aspect kept). Output: baseline JPEG, 3 components, 4:2:0, at `quality`. The sample's json keeps
the original format, mode and size. Evidence for the sizes: docs/data_pipeline.md.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from data.decode import decode_pil_checked, jpeg_header

ENCODING_VERSION = "store/1"  # part of every shard's plan digest: a change here re-plans the shards


@dataclass(frozen=True)
class StoreOptions:
    """How prepare stores images. Defaults keep every image at its size (re-encoding only the odd formats)."""

    max_side: int | None = None  # longer side limit in pixels; None keeps sizes. Recommended: 400 (docs/data_pipeline.md)
    quality: int = 90  # JPEG quality of re-encoded images: FFCV's ImageNet setting, about ImageNet's own

    def __post_init__(self) -> None:
        if self.max_side is not None and not 32 <= self.max_side <= 4096:
            raise ValueError(f"max_side={self.max_side}; valid: 32..4096 pixels, or None to keep sizes")
        if not 50 <= self.quality <= 100:
            raise ValueError(f"quality={self.quality}; valid: 50..100")

    def describe(self) -> dict:
        return {"version": ENCODING_VERSION, "max_side": self.max_side, "quality": self.quality}


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    width: int
    height: int
    source_width: int
    source_height: int
    format: str  # of the source file: "JPEG", "PNG", ...
    mode: str  # of the source file: "RGB", "CMYK", "L", ...
    reencoded: tuple[str, ...]  # why it was re-encoded ("format", "mode", "progressive", "max_side"); () = original


def fitted_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) shrunk so that the longer side is at most max_side, aspect kept; unchanged when it fits."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def reasons_to_reencode(data: bytes, fmt: str, mode: str, size: tuple[int, int], max_side: int | None) -> tuple[str, ...]:
    reasons = []
    if fmt != "JPEG":
        reasons.append("format")
    if mode != "RGB":
        reasons.append("mode")
    header = jpeg_header(data) if fmt == "JPEG" else None
    if header is not None and header.process != "baseline":
        reasons.append(header.process)
    if fitted_size(*size, max_side) != size:
        reasons.append("max_side")
    return tuple(reasons)


def store_image(data: bytes, key: str, options: StoreOptions) -> StoredImage:
    """Decode `data` fully (CorruptImageError if it cannot be) and return what to store; see the module docstring."""
    img, fmt, mode = decode_pil_checked(data, key)
    reasons = reasons_to_reencode(data, fmt, mode, img.size, options.max_side)
    if not reasons:
        return StoredImage(data, img.width, img.height, img.width, img.height, fmt, mode, ())
    width, height = fitted_size(img.width, img.height, options.max_side)
    out = img if (width, height) == img.size else img.resize((width, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=options.quality, subsampling="4:2:0", progressive=False, optimize=False)
    return StoredImage(buf.getvalue(), width, height, img.width, img.height, fmt, mode, reasons)
