"""AlexNet (Krizhevsky et al., NIPS 2012), as torchvision builds it (the one-GPU "one weird trick" variant,
Krizhevsky 2014, arXiv:1404.5997: 64/192/384/256/256 filters; the paper's two-GPU split is not kept)."""
from __future__ import annotations

from torchvision.models import AlexNet, alexnet as tv_alexnet

from .registry import register_model

__all__ = ["AlexNet", "alexnet"]


@register_model
def alexnet(num_classes: int = 1000, **kwargs) -> AlexNet:
    """torchvision's AlexNet (61,100,840 params); adaptive 6x6 pooling lets it take small images."""
    return tv_alexnet(weights=None, num_classes=num_classes, **kwargs)
