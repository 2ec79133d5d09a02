"""RegNetY-1.6GF (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020, arXiv:2003.13678), as
torchvision builds it: the accuracy-per-FLOP frontier at GoogLeNet's cost (about 1.6 GMACs at 224 px)."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet

from .registry import register_model

__all__ = ["RegNet", "regnety_016"]


@register_model
def regnety_016(num_classes: int = 1000, **kwargs) -> RegNet:
    """torchvision's `regnet_y_1_6gf` (11,202,430 params; SE in every block). timm calls it regnety_016.

    Built from torchvision's own parameters (torchvision/models/regnet.py, regnet_y_1_6gf) rather than by its
    builder, which computes the block widths with tensors and so fails under `torch.device("meta")`.
    """
    with torch.device("cpu"):
        params = BlockParams.from_init_params(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24, se_ratio=0.25)
    norm_layer = kwargs.pop("norm_layer", partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))
    return RegNet(params, num_classes=num_classes, norm_layer=norm_layer, **kwargs)
