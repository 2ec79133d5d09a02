"""Squeeze-and-Excitation block (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507).

The block itself is timm's `SEModule` (the one timm's `seresnet50`/`senet154` use): global average pool,
1x1 conv C -> C/r, ReLU, 1x1 conv C/r -> C, sigmoid, channel-wise rescale of the input (paper Eq. 2-4; a
1x1 conv on a 1x1 map is the paper's FC layer).
"""
from __future__ import annotations

from timm.layers import SEModule
from torch import nn

__all__ = ["SEModule", "SE_REDUCTION", "init_se_biases_", "se_layer"]

SE_REDUCTION = 16  # the SENet paper's r for all its ImageNet models


def se_layer(channels: int, reduction: int = SE_REDUCTION) -> SEModule:
    """An SE block for `channels` channels with squeeze width max(1, channels // reduction).

    Floor rounding (the paper's C/r); timm's default would round to a multiple of 8 instead, which would
    change the width of the narrow Inception branches (32 channels -> 8 instead of 2).
    """
    if channels < 1 or reduction < 1:
        raise ValueError(f"channels and reduction must be >= 1, got {channels=} {reduction=}")
    return SEModule(channels, rd_channels=max(1, channels // reduction))


def init_se_biases_(model: nn.Module, squeeze_bias: float = 1.0) -> nn.Module:
    """Start every SE block of `model` with all squeeze units active and a neutral gate (in place).

    Under a small-weight init (GoogLeNet's std 0.01) the squeeze pre-activation is about its bias, so with
    PyTorch's default uniform bias a narrow block (32 channels -> 2 units) often has every ReLU dead on
    every image: the block then never learns. A positive squeeze bias keeps the units active, as AlexNet's
    bias-1 init did for its ReLUs (Krizhevsky et al. 2012, Sec. 5); a zero excitation bias makes each gate
    start at about sigmoid(0) = 0.5 for every channel instead of a random per-channel preference.
    """
    for m in model.modules():
        if isinstance(m, SEModule):
            nn.init.constant_(m.fc1.bias, squeeze_bias)
            nn.init.zeros_(m.fc2.bias)
    return model
