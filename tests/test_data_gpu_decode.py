"""The device decode path (data/gpu_decode.py): on a CPU-only machine it runs with libjpeg-turbo standing in for
nvJPEG and must give the CPU path's batch (data.transforms.decode_crop + normalize) in shape, order and values."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import data.gpu_decode as gpu_decode
from data.gpu_decode import decode_batch
from data.transforms import IMAGENET_STD, Crop, center_crop, decode_crop, normalize, sample_crop

LEVEL = 1 / (255 * min(IMAGENET_STD))  # one uint8 step after normalisation, at the largest scale


def _encode(w: int, h: int, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def _batch():
    """JPEGs of several sizes, then the files nvJPEG does not take: CMYK, grayscale, PNG under .jpg."""
    data = [_encode(160 + 20 * i, 120 + 10 * i, i) for i in range(6)]
    data += [_encode(100, 80, 7, "CMYK"), _encode(90, 70, 8, "L"), _encode(80, 60, 9, fmt="PNG")]
    g = torch.Generator().manual_seed(5)
    sizes = [Image.open(io.BytesIO(d)).size for d in data]
    return data, [sample_crop(w, h, generator=g) for w, h in sizes], sizes


def _cpu_path(data, crops, size):
    return normalize(torch.stack([decode_crop(d, c, size, max_reduction=1) for d, c in zip(data, crops)]))


def test_cpu_stand_in_matches_the_cpu_path_in_shape_order_and_values():
    data, crops, _ = _batch()
    out = decode_batch(data, crops, 48, device="cpu", keys=[f"k{i}" for i in range(len(data))])
    assert out.images.shape == (9, 3, 48, 48) and out.images.dtype == torch.float32
    assert out.kept == list(range(9)) and out.corrupt == []
    diff = (out.images - _cpu_path(data, crops, 48)).abs()
    assert diff.max() <= LEVEL * 1.01  # resize rounding: at most one uint8 step


def test_eval_crops_and_tensor_inputs():
    data, _, sizes = _batch()
    crops = [center_crop(w, h, 32) for w, h in sizes]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    out = decode_batch(tensors, crops, 32, device="cpu", channels_last=True)
    assert out.images.is_contiguous(memory_format=torch.channels_last)
    assert (out.images - _cpu_path(data, crops, 32)).abs().max() <= LEVEL * 1.01


def test_a_sample_no_decoder_reads_is_left_out_and_reported():
    data, crops, _ = _batch()
    data[2] = data[2][:200]  # truncated inside the entropy-coded data
    data[4] = b"not an image"
    out = decode_batch(data, crops, 32, device="cpu", keys=[f"k{i}" for i in range(len(data))])
    reasons = dict(out.corrupt)
    assert sorted(reasons) == [2, 4] and "truncated" in reasons[2] and "cannot identify image" in reasons[4]
    assert out.kept == [0, 1, 3, 5, 6, 7, 8] and out.images.shape[0] == 7
    kept_crops = [crops[i] for i in out.kept]
    assert (out.images - _cpu_path([data[i] for i in out.kept], kept_crops, 32)).abs().max() <= LEVEL * 1.01


def test_a_failing_batch_call_falls_back_to_one_image_at_a_time(monkeypatch):
    data, crops, _ = _batch()
    real, calls = gpu_decode.decode_jpeg, []

    def batch_refuses(inputs, **kw):
        calls.append(type(inputs).__name__)
        if isinstance(inputs, list):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return real(inputs, **kw)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", batch_refuses)
    out = decode_batch(data, crops, 32, device="cpu")
    assert calls[0] == "list" and calls.count("Tensor") == 7  # the 6 colour and the gray JPEG, one by one
    assert (out.images - _cpu_path(data, crops, 32)).abs().max() <= LEVEL * 1.01


def test_one_crop_per_image():
    with pytest.raises(ValueError, match="2 images but 1 crops"):
        decode_batch([b"a", b"b"], [Crop(0, 0, 1, 1)], 8, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu_path():
    data, crops, _ = _batch()
    out = decode_batch(data, crops, 48, device="cuda")
    assert out.images.is_cuda and out.kept == list(range(9))
    diff = (out.images.cpu() - _cpu_path(data, crops, 48)).abs()
    assert diff.mean() < 2 * LEVEL  # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a step or two
