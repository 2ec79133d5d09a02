"""Image decoding that survives what ImageNet contains.

ILSVRC-2012 holds CMYK JPEGs (22 in train, one in val), grayscale JPEGs, one PNG stored under a .JPEG
name (n02105855_2933.JPEG) and, in damaged copies, truncated or empty files. The fast path is
torchvision's libjpeg-turbo/libpng decoder (`torchvision.io.decode_image`); PIL is the fallback for
anything it refuses; a file both refuse raises `CorruptImageError`.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg


class CorruptImageError(ValueError):
    """An image that neither torchvision nor PIL can decode; `key` names the sample, `reason` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt image {key!r}: {reason}")
        self.key = key
        self.reason = reason


def _as_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    # frombuffer needs a writable buffer to avoid a warning; bytearray copies once (cheap next to decoding).
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _pil_decode(data: bytes | bytearray | memoryview, key: str) -> tuple[Image.Image, str, str]:
    """Open, load and convert to RGB with PIL; returns (RGB image, file format, original mode)."""
    if len(data) == 0:
        raise CorruptImageError(key, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, mode = img.format or "?", img.mode
            img.load()
            return img.convert("RGB"), fmt, mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise CorruptImageError(key, f"PIL: {type(e).__name__}: {e}") from e


def decode_pil(data: bytes | bytearray | memoryview, key: str = "?") -> Image.Image:
    """Decode fully with PIL (`open`, `load`, `convert("RGB")`): the check `jobs.prepare` runs on every file."""
    return _pil_decode(data, key)[0]


def inspect_image(data: bytes | bytearray | memoryview, key: str = "?") -> tuple[int, int, str, str]:
    """Decode fully with PIL and return (width, height, file format, original mode), e.g. (500, 375, "JPEG", "CMYK")."""
    img, fmt, mode = _pil_decode(data, key)
    return img.width, img.height, fmt, mode


def decode_rgb(data: bytes | bytearray | memoryview, key: str = "?") -> torch.Tensor:
    """Decode image bytes to a uint8 RGB tensor [3, H, W]: torchvision first, PIL when torchvision refuses."""
    if len(data) == 0:
        raise CorruptImageError(key, "zero-byte file")
    try:
        return decode_image(_as_tensor(data), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as tv_error:
        try:
            img = decode_pil(data, key)
        except CorruptImageError as e:
            raise CorruptImageError(key, f"torchvision: {tv_error}; {e.reason}") from e
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_rgb_cuda(data: bytes | bytearray | memoryview, key: str = "?", device: str = "cuda") -> torch.Tensor:
    """Decode a JPEG on the GPU with nvJPEG (`decode_jpeg(..., device=...)`); other files via `decode_rgb`.

    The result lives on `device`. nvJPEG rejects CMYK and non-JPEG files, which take the CPU path.
    """
    if len(data) == 0:
        raise CorruptImageError(key, "zero-byte file")
    try:
        return decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return decode_rgb(data, key).to(device)
