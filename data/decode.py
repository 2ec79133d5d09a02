"""Image decoding that survives what ImageNet contains, and decodes no more pixels than a crop needs.

ILSVRC-2012 holds CMYK JPEGs (22 in train, one in val), grayscale JPEGs, one PNG stored under a .JPEG
name (n02105855_2933.JPEG) and, in damaged copies, truncated or empty files. `jobs.prepare` stores every image
as a baseline RGB JPEG (data/encode.py), so on prepared shards only the fast path runs:

- `decode_reduced` decodes a 3- or 1-component JPEG with libjpeg-turbo through simplejpeg, at 1/2, 1/4 or 1/8
  scale when asked (DCT-domain scaling: the inverse DCT, upsampling and colour conversion run on fewer pixels);
- anything else (CMYK, PNG, a JPEG simplejpeg refuses) goes through `decode_rgb`: torchvision's decoder
  (`torchvision.io.decode_image`), then PIL; a file both refuse raises `CorruptImageError`.

All three decoders are libjpeg-turbo with its default (accurate) IDCT and upsampling, and give identical pixels.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

SOF_MARKERS = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential",
               0xC6: "differential-progressive", 0xC7: "differential-lossless", 0xC9: "arithmetic",
               0xCA: "arithmetic-progressive", 0xCB: "arithmetic-lossless", 0xCD: "differential-arithmetic",
               0xCE: "differential-arithmetic-progressive", 0xCF: "differential-arithmetic-lossless"}
STANDALONE_MARKERS = set(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field
HEADER_SCAN_LIMIT = 1 << 20  # a frame header further in than this is not looked for


class CorruptImageError(ValueError):
    """An image that no decoder can decode; `key` names the sample, `reason` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt image {key!r}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG's frame header: size, colour components (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK) and coding process."""

    width: int
    height: int
    components: int
    process: str  # "baseline", "progressive", ... (SOF_MARKERS)

    @property
    def fast_path(self) -> bool:
        """Decodable by `decode_reduced` (and by nvJPEG): Huffman-coded, 8-bit, gray or three-component."""
        return self.process in ("baseline", "extended", "progressive") and self.components in (1, 3)


def jpeg_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """Parse the frame header (SOFn) of a JPEG without decoding; None when `data` is not a JPEG or has none."""
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    pos, end = 2, min(len(view), HEADER_SCAN_LIMIT)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        length = view[pos + 2] << 8 | view[pos + 3]
        if marker in SOF_MARKERS:
            if pos + 10 > len(view):
                return None
            height = view[pos + 5] << 8 | view[pos + 6]
            width = view[pos + 7] << 8 | view[pos + 8]
            return JpegHeader(width, height, view[pos + 9], SOF_MARKERS[marker])
        if marker == 0xDA or length < 2:  # start of scan before any frame header, or a broken length
            return None
        pos += 2 + length
    return None


def _as_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    # frombuffer needs a writable buffer to avoid a warning; bytearray copies once (cheap next to decoding).
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_pil_checked(data: bytes | bytearray | memoryview, key: str = "?") -> tuple[Image.Image, str, str]:
    """Open, load fully and convert to RGB with PIL; returns (RGB image, file format, original mode)."""
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
    """Decode fully with PIL (`open`, `load`, `convert("RGB")`)."""
    return decode_pil_checked(data, key)[0]


def inspect_image(data: bytes | bytearray | memoryview, key: str = "?") -> tuple[int, int, str, str]:
    """Decode fully with PIL and return (width, height, file format, original mode), e.g. (500, 375, "JPEG", "CMYK")."""
    img, fmt, mode = decode_pil_checked(data, key)
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


def decode_reduced(data: bytes | bytearray | memoryview, key: str = "?", reduce: int = 1,
                   header: JpegHeader | None = None) -> torch.Tensor:
    """Decode to uint8 RGB [3, H', W'] with H' = ceil(H / reduce) (reduce in 1, 2, 4, 8; JPEGs on the fast path
    only, others decode at full size: check the result's shape). The result may be a non-contiguous view of an
    HWC array, the memory layout torchvision's uint8 resize runs fastest on."""
    if reduce not in (1, 2, 4, 8):
        raise ValueError(f"reduce={reduce}; valid: 1, 2, 4, 8 (libjpeg-turbo's power-of-two DCT scaling)")
    header = header or jpeg_header(data)
    if header is None or not header.fast_path:
        return decode_rgb(data, key)
    try:
        array = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-header.height // reduce),
                                       min_width=-(-header.width // reduce))
    except ValueError:  # truncated or malformed: let the tolerant decoders decide (or name the problem)
        return decode_rgb(data, key)
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_rgb_cuda(data: bytes | bytearray | memoryview, key: str = "?", device: str = "cuda") -> torch.Tensor:
    """One JPEG on the GPU with nvJPEG, others via `decode_rgb`: what ShardStream(decode_device=...) calls today.

    Superseded by `data.gpu_decode.decode_batch` (one batched call, crop, resize and normalise on the device), which
    the stream takes over when the data branch merges."""
    if len(data) == 0:
        raise CorruptImageError(key, "zero-byte file")
    try:
        return decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return decode_rgb(data, key).to(device)


def image_size(data: bytes | bytearray | memoryview, key: str = "?") -> tuple[int, int]:
    """(width, height) from a JPEG's header, or by opening the file with PIL (header only) for other formats."""
    header = jpeg_header(data)
    if header is not None:
        return header.width, header.height
    try:
        return Image.open(io.BytesIO(data)).size
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(key, f"PIL: {type(e).__name__}: {e}") from e
