"""ResNet-18/34/50 (He et al., CVPR 2016, arXiv:1512.03385) from torchvision; SE-ResNet-50 and SENet-154
(Hu et al., CVPR 2018, arXiv:1709.01507) from timm, which builds both with its ResNet class and
`attn_layer='se'` (SENet-154: ResNeXt-style 64x4d bottlenecks, 3/8/36/3 blocks, deep stem)."""
from __future__ import annotations

import timm
from torchvision.models import ResNet, resnet18 as tv_resnet18, resnet34 as tv_resnet34, resnet50 as tv_resnet50

from .registry import register_model

__all__ = ["resnet18", "resnet34", "resnet50", "se_resnet50", "senet154"]


def _timm(variant: str, num_classes: int, **kwargs):
    # zero_init_last=False: timm zero-initialises the last BN of every residual branch (Goyal et al. 2017),
    # which the SENet paper does not do; with it, the whole branch (convs, BNs, SE) gets no gradient at
    # step 0. Off, init is the paper's He init and every parameter learns from the first step.
    kwargs.setdefault("zero_init_last", False)
    return timm.create_model(variant, pretrained=False, num_classes=num_classes, **kwargs)


@register_model
def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ResNet-18 (11,689,512 params), basic blocks 2/2/2/2."""
    return tv_resnet18(weights=None, num_classes=num_classes, **kwargs)


@register_model
def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ResNet-34 (21,797,672 params), basic blocks 3/4/6/3."""
    return tv_resnet34(weights=None, num_classes=num_classes, **kwargs)


@register_model
def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision's ResNet-50 (25,557,032 params), stride on the 3x3 conv ("ResNet v1.5")."""
    return tv_resnet50(weights=None, num_classes=num_classes, **kwargs)


@register_model
def se_resnet50(num_classes: int = 1000, **kwargs):
    """timm `seresnet50` (28,088,024 params)."""
    return _timm("seresnet50", num_classes, **kwargs)


@register_model
def senet154(num_classes: int = 1000, **kwargs):
    """timm `senet154` (115,088,984 params), the ILSVRC 2017 winning single architecture."""
    return _timm("senet154", num_classes, **kwargs)
