"""Training and evaluation transforms, as in torchvision's classification reference
(`references/classification/presets.py`): RandomResizedCrop + flip for training, resize to image_size / 0.875 then
centre crop for evaluation. Images stay uint8 until `normalize`, which runs on the training device.

Two ways to run them:
- `build_transform` (v2 transforms on a decoded uint8 tensor), for callers that decode first;
- crop parameters drawn from the image SIZE with a caller-supplied generator (`sample_crop`, `center_crop`: the same
  distribution as RandomResizedCrop / RandomHorizontalFlip, draw for draw), then `decode_crop`, which decodes only at
  the scale the crop needs (libjpeg-turbo DCT scaling through data.decode) and resizes the region straight to the
  output. The same `Crop` drives `data.gpu_decode.decode_batch`, so both paths see the same augmentation.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from data.decode import JpegHeader, decode_reduced, jpeg_header

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # 224 / 256, the ratio of the AlexNet/GoogLeNet evaluation protocol
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's area range (Inception's "scale augmentation")
CROP_RATIO = (3 / 4, 4 / 3)

AUTO_AUGMENT = ("randaugment", "trivialaugment")


class Crop(NamedTuple):
    """A source-pixel region to resize to the output square, and whether to mirror it afterwards."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def augment_op(auto_augment: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """RandAugment or TrivialAugmentWide on uint8 tensors, None for no auto-augmentation."""
    if auto_augment is None:
        return None
    if auto_augment == "randaugment":
        return v2.RandAugment()
    if auto_augment == "trivialaugment":
        return v2.TrivialAugmentWide()
    raise ValueError(f"auto_augment={auto_augment!r}; valid: None, {', '.join(map(repr, AUTO_AUGMENT))}")


def train_transform(image_size: int, auto_augment: str | None = None,
                    crop_scale: tuple[float, float] = CROP_SCALE) -> Callable[[torch.Tensor], torch.Tensor]:
    """RandomResizedCrop(image_size) + horizontal flip, optionally RandAugment or TrivialAugmentWide.

    `crop_scale` is the crop's area range (ImageNet: 0.08-1); small synthetic sets whose object fills
    35-75 % of the side train better with a larger lower bound, since tiny crops can miss the object.
    """
    steps: list = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    op = augment_op(auto_augment)
    return v2.Compose(steps + ([op] if op else []))


def eval_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize the shorter side to int(image_size / 0.875), then centre crop image_size."""
    return v2.Compose([v2.Resize(int(image_size / EVAL_CROP_RATIO), antialias=True), v2.CenterCrop(image_size)])


def _ten_crop(resize, crop, image: torch.Tensor) -> torch.Tensor:
    return torch.stack(crop(resize(image)))


def ten_crop_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The eval preset's resize, then TenCrop (four corners and centre, and the same mirrored; Krizhevsky et al.
    2012, sec. 4.1): uint8 [3, H, W] -> [10, 3, S, S]; crop 4 equals the eval preset."""
    resize = v2.Resize(int(image_size / EVAL_CROP_RATIO), antialias=True)
    return functools.partial(_ten_crop, resize, v2.TenCrop(image_size))


def build_transform(train: bool, image_size: int, auto_augment: str | None = None,
                    crop_scale: tuple[float, float] = CROP_SCALE) -> Callable:
    """The training or evaluation preset; `auto_augment` and `crop_scale` apply to training only."""
    return train_transform(image_size, auto_augment, crop_scale) if train else eval_transform(image_size)


@functools.lru_cache(maxsize=None)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's float32 log of the aspect range, as Python floats (the values its uniform_ draw receives)."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return low, high


def sample_crop(width: int, height: int, scale: tuple[float, float] = CROP_SCALE,
                ratio: tuple[float, float] = CROP_RATIO, generator: torch.Generator | None = None) -> Crop:
    """RandomResizedCrop's parameters plus RandomHorizontalFlip's coin, drawn from `generator` in the same order and
    with the same arithmetic as torchvision (v2.RandomResizedCrop.make_params): equal seeds give equal crops.
    One scratch tensor serves the float draws (same values, a third of the time of fresh tensors per draw)."""
    area = height * width
    log_low, log_high = _log_ratio(tuple(ratio))
    draw = torch.empty(1)
    for _ in range(10):
        target_area = area * draw.uniform_(scale[0], scale[1], generator=generator).item()
        aspect = draw.uniform_(log_low, log_high, generator=generator).exp_().item()  # float32 exp, as torchvision
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            break
    else:  # fallback to a central crop of the allowed aspect ratio
        in_ratio = width / height
        w, h = width, height
        if in_ratio < min(ratio):
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            w = int(round(h * max(ratio)))
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(draw.uniform_(generator=generator).item() < 0.5)  # torch.rand(1)'s draw
    return Crop(top, left, h, w, flip)


def center_crop(width: int, height: int, image_size: int) -> Crop:
    """The evaluation preset as a source region: the centred square that resize(image_size / 0.875) + centre crop
    keeps, to be resized to image_size (equal to eval_transform up to rounding)."""
    short = min(width, height)
    side = min(short, max(1, round(image_size * short / int(image_size / EVAL_CROP_RATIO))))
    return Crop(round((height - side) / 2), round((width - side) / 2), side, side, False)


def dct_reduction(crop: Crop, size: int, max_reduction: int = 8) -> int:
    """The largest power-of-two reduction (1, 2, 4 or 8, at most max_reduction) at which the crop still covers
    >= size pixels each way, so resizing from the reduced decode loses no detail the output can hold."""
    k = 1
    while k < max_reduction and min(crop.height, crop.width) >= size * 2 * k:
        k *= 2
    return k


def _scaled(crop: Crop, sy: float, sx: float, height: int, width: int) -> tuple[int, int, int, int]:
    top, left = min(round(crop.top * sy), height - 1), min(round(crop.left * sx), width - 1)
    bottom = min(max(round((crop.top + crop.height) * sy), top + 1), height)
    right = min(max(round((crop.left + crop.width) * sx), left + 1), width)
    return top, left, bottom - top, right - left


def resize_region(image: torch.Tensor, region: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Crop `region` (top, left, h, w) of a uint8 [3, H, W] image, resize it to size x size (bilinear, antialiased,
    as RandomResizedCrop), mirror it if asked."""
    top, left, h, w = region
    # Antialiasing only changes a downscale; a pure upscale gives the same pixels without it, about 15 % sooner.
    out = F.resize(image[:, top:top + h, left:left + w], [size, size], antialias=h > size or w > size)
    return out.flip(-1) if flip else out


def decode_crop(data: bytes | bytearray | memoryview, crop: Crop, size: int, key: str = "?",
                header: JpegHeader | None = None, max_reduction: int = 8) -> torch.Tensor:
    """Decode `data` at the reduction the crop allows, crop, resize to size x size and flip: uint8 [3, size, size].
    `crop` is in the full image's pixels; max_reduction=1 decodes at full size (pixel-equal to the v2 transforms).
    Raises data.decode.CorruptImageError for undecodable input."""
    header = header or jpeg_header(data)
    image = decode_reduced(data, key, dct_reduction(crop, size, max_reduction), header)
    h, w = image.shape[-2:]
    full_h, full_w = (header.height, header.width) if header is not None else (h, w)
    return resize_region(image, _scaled(crop, h / full_h, w / full_w, h, w), size, crop.flip)


@functools.lru_cache(maxsize=None)
def normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean * 255, 1 / (std * 255)) as float32 [1, 3, 1, 1] on `device`, built once per device."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).mul_(255).view(1, 3, 1, 1)
    inv_std = torch.tensor(IMAGENET_STD, device=device).mul_(255).reciprocal_().view(1, 3, 1, 1)
    return mean, inv_std


def normalize(images: torch.Tensor, device: torch.device | str | None = None,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, 3, H, W] (or [3, H, W]) -> float32 normalised with the ImageNet mean/std, on `device`.

    The copy to `device` happens while still uint8; the float conversion runs there.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if device is not None:
        images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    mean, inv_std = normalization_constants(images.device)
    if images.dim() == 3:
        mean, inv_std = mean[0], inv_std[0]
    out = (images.float() - mean) * inv_std
    return out.contiguous(memory_format=torch.channels_last) if channels_last and out.dim() == 4 else out
