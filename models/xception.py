"""Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017,
arXiv:1610.02357), as timm builds the paper's network (`legacy_xception`; timm's `xception41/65/71` are the
DeepLab "aligned" variants, not the paper's). Its published figures are at 299 px."""
from __future__ import annotations

import timm
from torch import nn

from .registry import register_model

__all__ = ["xception"]


@register_model
def xception(num_classes: int = 1000, **kwargs) -> nn.Module:
    """timm's `legacy_xception` (22,855,952 params, the paper's Table 3 count)."""
    return timm.create_model("legacy_xception", pretrained=False, num_classes=num_classes, **kwargs)
