"""EfficientNet-B1 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019, arXiv:1905.11946),
as torchvision builds it. Its published figures are at its own resolution, 240 px (the B0 224 px scaled by 1.1)."""
from __future__ import annotations

from torchvision.models import EfficientNet, efficientnet_b1 as tv_efficientnet_b1

from .registry import register_model

__all__ = ["efficientnet_b1"]


@register_model
def efficientnet_b1(num_classes: int = 1000, **kwargs) -> EfficientNet:
    """torchvision's EfficientNet-B1 (7,794,184 params; dropout 0.2, stochastic depth 0.2)."""
    return tv_efficientnet_b1(weights=None, num_classes=num_classes, **kwargs)
