"""The upstream constructor (torchvision or timm) that builds the same architecture as a registered model.

Exported weights carry plain upstream `state_dict` keys, so `Upstream.build()` loads them with `strict=True`
(tests/test_export.py checks every registered model). SE-GoogLeNet with SE blocks has no upstream twin; with
`se_placement=None` it is torchvision's GoogLeNet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["Upstream", "upstream_for"]

# registry name -> (library, builder name): the factories in this package build exactly these.
_UPSTREAM = {
    "alexnet": ("torchvision", "alexnet"),
    "efficientnet_b1": ("torchvision", "efficientnet_b1"),
    "googlenet": ("torchvision", "googlenet"),
    "regnety_016": ("torchvision", "regnet_y_1_6gf"),
    "resnet18": ("torchvision", "resnet18"),
    "resnet34": ("torchvision", "resnet34"),
    "resnet50": ("torchvision", "resnet50"),
    "se_resnet50": ("timm", "seresnet50"),
    "senet154": ("timm", "senet154"),
    "xception": ("timm", "legacy_xception"),
}
# Keyword arguments of our factories that choose an initialisation only: the upstream builder has no use for them.
_INIT_ONLY = ("init", "zero_init_last")
_GOOGLENET_ARGS = ("aux_logits", "dropout", "dropout_aux")


@dataclass(frozen=True)
class Upstream:
    library: str  # "torchvision" or "timm"
    builder: str  # torchvision.models.get_model(builder, ...) / timm.create_model(builder, ...)
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The upstream architecture, randomly initialised (no weights are downloaded)."""
        if self.library == "torchvision":
            import torchvision

            return torchvision.models.get_model(self.builder, weights=None, **self.kwargs)
        import timm

        return timm.create_model(self.builder, pretrained=False, **self.kwargs)

    def code(self) -> str:
        """The Python call that builds it, for humans (config.json of an export)."""
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        if self.library == "torchvision":
            return f"torchvision.models.get_model({self.builder!r}, weights=None{args})"
        return f"timm.create_model({self.builder!r}, pretrained=False{args})"


def upstream_for(name: str, num_classes: int = 1000, **kwargs) -> Upstream | None:
    """The upstream twin of registered model `name` built with `kwargs`, or None when there is none."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _INIT_ONLY}
    if name == "se_googlenet":
        if kwargs.pop("se_placement", "branch") is not None:
            return None  # SE blocks in the Inception modules: only this project builds that network
        kwargs.pop("se_reduction", None)
        name = "googlenet"
    if name not in _UPSTREAM:
        return None
    library, builder = _UPSTREAM[name]
    if name == "googlenet":
        # Ours never transforms the input (the data pipeline normalises); init_weights=False skips torchvision's
        # slow truncated-normal init, which loading the weights overwrites anyway.
        kwargs = {"aux_logits": True, **{k: v for k, v in kwargs.items() if k in _GOOGLENET_ARGS},
                  "transform_input": False, "init_weights": False}
    return Upstream(library, builder, {"num_classes": num_classes, **kwargs})
