"""Decoding every kind of file ImageNet holds: RGB, CMYK and grayscale JPEGs, PNG under .JPEG, broken files."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import data.decode as decode
from data.decode import CorruptImageError, decode_pil, decode_rgb, inspect_image


def _image(w=40, h=30) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _close(a: torch.Tensor, b: np.ndarray, tol: float) -> bool:
    return float((a.permute(1, 2, 0).float() - torch.from_numpy(np.array(b)).float()).abs().mean()) < tol


def test_rgb_jpeg_is_uint8_chw():
    img = _image()
    out = decode_rgb(_encode(img, "JPEG", quality=95), "k")
    assert out.dtype == torch.uint8 and out.shape == (3, 30, 40)
    assert _close(out, np.asarray(img), 4)


def test_cmyk_jpeg_matches_pil_colours():
    data = _encode(_image().convert("CMYK"), "JPEG", quality=95)
    out = decode_rgb(data, "cmyk")
    assert out.shape == (3, 30, 40)
    assert _close(out, np.asarray(decode_pil(data)), 6)
    assert inspect_image(data)[2:] == ("JPEG", "CMYK")


def test_grayscale_jpeg_gives_three_equal_channels():
    out = decode_rgb(_encode(_image().convert("L"), "JPEG"), "gray")
    assert out.shape == (3, 30, 40)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_png_under_jpeg_name_decodes():
    img = _image()
    data = _encode(img, "PNG")
    assert torch.equal(decode_rgb(data, "png").permute(1, 2, 0), torch.from_numpy(np.array(img)))
    assert inspect_image(data)[2] == "PNG"


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_png_modes_come_out_rgb(mode):
    assert decode_rgb(_encode(_image().convert(mode), "PNG"), mode).shape == (3, 30, 40)


def test_truncated_jpeg_raises_with_key_and_both_reasons():
    data = _encode(_image(200, 150), "JPEG")
    with pytest.raises(CorruptImageError) as e:
        decode_rgb(data[: len(data) // 2], "n01440764_1")
    assert e.value.key == "n01440764_1" and "torchvision" in e.value.reason and "PIL" in e.value.reason
    with pytest.raises(CorruptImageError):
        inspect_image(data[: len(data) // 2], "n01440764_1")


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff"])
def test_zero_byte_and_garbage_raise(data):
    with pytest.raises(CorruptImageError):
        decode_rgb(data, "bad")
    with pytest.raises(CorruptImageError):
        inspect_image(data, "bad")


def test_pil_fallback_when_torchvision_refuses(monkeypatch):
    """BMP is not a torchvision format: PIL takes over. Also a torchvision refusal of a JPEG (e.g. CMYK in old
    versions) falls back to PIL."""
    img = _image()
    assert torch.equal(decode_rgb(_encode(img, "BMP"), "bmp").permute(1, 2, 0), torch.from_numpy(np.array(img)))

    def refuse(*a, **k):
        raise RuntimeError("Unsupported color conversion request")

    monkeypatch.setattr(decode, "decode_image", refuse)
    data = _encode(img.convert("CMYK"), "JPEG")
    assert torch.equal(decode_rgb(data, "cmyk"), torch.from_numpy(np.array(decode_pil(data))).permute(2, 0, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_matches_cpu():
    from data.decode import decode_rgb_cuda

    for data in (_encode(_image(), "JPEG"), _encode(_image().convert("CMYK"), "JPEG"), _encode(_image(), "PNG")):
        gpu = decode_rgb_cuda(data, "k")
        assert gpu.is_cuda and gpu.shape == (3, 30, 40)
        assert (gpu.cpu().float() - decode_rgb(data).float()).abs().mean() < 3
