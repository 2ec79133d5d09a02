import pytest
import torch

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, eval_transform, normalize, train_transform


def _img(h=90, w=120):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8)


@pytest.mark.parametrize("aa", [None, "randaugment", "trivialaugment"])
def test_train_preset_keeps_uint8_and_size(aa):
    out = train_transform(64, aa)(_img())
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)


def test_unknown_auto_augment_names_valid_ones():
    with pytest.raises(ValueError, match="randaugment"):
        train_transform(64, "autoaugment-v9")


def test_eval_preset_resizes_shorter_side_then_centre_crops():
    img = _img(100, 200)
    out = eval_transform(64)(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    # shorter side -> int(64 / 0.875) = 73, then a centre crop: deterministic
    assert torch.equal(out, eval_transform(64)(img))
    assert build_transform(False, 64)(img).shape == (3, 64, 64)


def test_normalize_uses_imagenet_statistics():
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    imgs = mean.round().to(torch.uint8).expand(3, 4, 4).unsqueeze(0).repeat(2, 1, 1, 1)
    out = normalize(imgs)
    assert out.dtype == torch.float32 and out.abs().max() < 0.01
    white = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(white[0, :, 0, 0], expected, atol=1e-5)


def test_normalize_channels_last_and_device():
    out = normalize(torch.zeros((2, 3, 8, 8), dtype=torch.uint8), device="cpu", channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError):
        normalize(torch.zeros((1, 3, 2, 2)))


# -- crop parameters drawn from the size, then a crop-first decode (data.transforms.sample_crop / decode_crop) --------

def _jpeg(w=300, h=200, quality=90, mode="RGB", fmt="JPEG", noise=12.0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(w * h)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1) + rng.normal(0, noise, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode).save(buf, fmt, quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 48), (1000, 10), (10, 1000)])
def test_sample_crop_draws_exactly_what_random_resized_crop_and_flip_draw(size):
    from torchvision.transforms import v2

    from data.transforms import sample_crop

    width, height = size
    rrc = v2.RandomResizedCrop(224, scale=(0.25, 1.0))
    for seed in range(300):  # extreme aspects take the fallback central crop
        torch.manual_seed(seed)
        p = rrc.make_params([torch.empty(3, height, width)])
        flip = torch.rand(1).item() < 0.5
        crop = sample_crop(width, height, scale=(0.25, 1.0), generator=torch.Generator().manual_seed(seed))
        assert tuple(crop) == (p["top"], p["left"], p["height"], p["width"], flip)


def test_decode_crop_at_full_scale_equals_the_v2_transforms():
    from torchvision.transforms.v2 import functional as F

    from data.decode import decode_rgb
    from data.transforms import decode_crop, sample_crop

    data, g = _jpeg(), torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = sample_crop(300, 200, generator=g)
        expected = F.resized_crop(decode_rgb(data), crop.top, crop.left, crop.height, crop.width, [64, 64],
                                  antialias=True)
        expected = expected.flip(-1) if crop.flip else expected
        assert torch.equal(decode_crop(data, crop, 64, max_reduction=1), expected)


def test_decode_crop_decodes_large_crops_at_reduced_scale(monkeypatch):
    import data.transforms as transforms
    from data.transforms import Crop, decode_crop, dct_reduction

    data, crop = _jpeg(640, 480), Crop(10, 20, 400, 600, True)
    assert [dct_reduction(crop, s) for s in (224, 190, 96, 40, 10)] == [1, 2, 4, 8, 8]
    shapes = []
    real = transforms.decode_reduced
    monkeypatch.setattr(transforms, "decode_reduced", lambda *a, **k: shapes.append(out := real(*a, **k)) or out)
    reduced, full = decode_crop(data, crop, 96), decode_crop(data, crop, 96, max_reduction=1)
    assert shapes[0].shape == (3, 120, 160) and shapes[1].shape == (3, 480, 640)
    assert reduced.shape == full.shape == (3, 96, 96)
    assert (reduced.float() - full.float()).abs().mean() < 3  # DCT scaling ~ an antialiasing filter


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")])
def test_decode_crop_takes_every_format_imagenet_holds(mode, fmt):
    from data.transforms import Crop, decode_crop

    out = decode_crop(_jpeg(120, 90, mode=mode, fmt=fmt), Crop(5, 10, 80, 100, False), 32)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_decode_crop_names_a_corrupt_sample():
    from data.decode import CorruptImageError
    from data.transforms import Crop, decode_crop

    with pytest.raises(CorruptImageError, match="'k7'"):
        decode_crop(_jpeg()[:300], Crop(0, 0, 100, 100), 32, key="k7")


def test_center_crop_matches_the_eval_preset():
    from data.decode import decode_rgb
    from data.transforms import center_crop, decode_crop

    for w, h in [(300, 200), (200, 300), (257, 256)]:
        data = _jpeg(w, h, noise=0)
        crop = center_crop(w, h, 64)
        assert crop.height == crop.width == round(64 * min(w, h) / 73) and not crop.flip
        diff = (decode_crop(data, crop, 64).float() - eval_transform(64)(decode_rgb(data)).float()).abs()
        assert diff.mean() < 3  # the same region up to rounding of the resized size


def test_normalization_constants_are_built_once_per_device():
    from data.transforms import normalization_constants

    a = normalization_constants(torch.device("cpu"))
    normalize(torch.zeros((2, 3, 4, 4), dtype=torch.uint8))
    assert normalization_constants(torch.device("cpu"))[0] is a[0]
