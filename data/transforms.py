"""Transform presets on uint8 CHW tensors (torchvision.transforms.v2), as in torchvision's classification
reference (`references/classification/presets.py`): RandomResizedCrop + flip for training, resize to
image_size / 0.875 then centre crop for evaluation. Images stay uint8 until `normalize`, which the training
loop applies on its device, so the loader moves a quarter of the bytes float32 would.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # 224 / 256, the ratio of the AlexNet/GoogLeNet evaluation protocol

AUTO_AUGMENT = ("randaugment", "trivialaugment")


def train_transform(image_size: int, auto_augment: str | None = None,
                    crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable[[torch.Tensor], torch.Tensor]:
    """RandomResizedCrop(image_size) + horizontal flip, optionally RandAugment or TrivialAugmentWide.

    `crop_scale` is the crop's area range (ImageNet: 0.08-1); small synthetic sets whose object fills
    35-75 % of the side train better with a larger lower bound, since tiny crops can miss the object.
    """
    steps: list = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    if auto_augment == "randaugment":
        steps.append(v2.RandAugment())
    elif auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif auto_augment is not None:
        raise ValueError(f"auto_augment={auto_augment!r}; valid: None, {', '.join(map(repr, AUTO_AUGMENT))}")
    return v2.Compose(steps)


def eval_transform(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize the shorter side to int(image_size / 0.875), then centre crop image_size."""
    return v2.Compose([v2.Resize(int(image_size / EVAL_CROP_RATIO), antialias=True), v2.CenterCrop(image_size)])


def build_transform(train: bool, image_size: int, auto_augment: str | None = None,
                    crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """The training or evaluation preset; `auto_augment` and `crop_scale` apply to training only."""
    return train_transform(image_size, auto_augment, crop_scale) if train else eval_transform(image_size)


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
    shape = (1, 3, 1, 1) if images.dim() == 4 else (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).mul_(255).view(shape)
    inv_std = torch.tensor(IMAGENET_STD, device=images.device).mul_(255).reciprocal_().view(shape)
    out = (images.float() - mean) * inv_std
    return out.contiguous(memory_format=torch.channels_last) if channels_last and out.dim() == 4 else out
