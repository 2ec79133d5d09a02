"""Models: a registry of SE-GoogLeNet and the published baselines, and one output convention.

    from models import get_model, list_models, split_outputs
    model = get_model("se_googlenet", num_classes=1000)   # se_placement="branch" | "module" | None
    logits, aux = split_outputs(model(images))            # aux: [] in eval mode or without aux heads

This package imports nothing from the rest of the project.
"""
from . import alexnet, efficientnet, googlenet, regnet, resnet, xception  # noqa: F401  (registers the factories)
from .outputs import AUX_LOSS_WEIGHT, GoogLeNetOutputs, has_aux, loss_with_aux, split_outputs, unwrap_model
from .published import ILSVRC_WINNERS, PUBLISHED
from .registry import get_model, list_models, register_model
from .squeeze_excite import SEModule, se_layer
from .summary import summarize

__all__ = [
    "AUX_LOSS_WEIGHT",
    "GoogLeNetOutputs",
    "ILSVRC_WINNERS",
    "PUBLISHED",
    "SEModule",
    "get_model",
    "has_aux",
    "list_models",
    "loss_with_aux",
    "register_model",
    "se_layer",
    "split_outputs",
    "summarize",
    "unwrap_model",
]
