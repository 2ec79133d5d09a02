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
