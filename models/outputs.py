"""One output convention for every model, so the training loop treats them alike.

In training mode a model with auxiliary heads (GoogLeNet) returns torchvision's
`GoogLeNetOutputs(logits, aux_logits2, aux_logits1)`; in eval mode, and for every other model, a plain
logits tensor. `split_outputs` turns either into `(logits, [aux, ...])`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.googlenet import GoogLeNetOutputs

__all__ = ["AUX_LOSS_WEIGHT", "GoogLeNetOutputs", "has_aux", "loss_with_aux", "split_outputs", "unwrap_model"]

# "the losses of the auxiliary classifiers were weighted by 0.3" (Szegedy et al. 2014, Sec. 5).
AUX_LOSS_WEIGHT = 0.3


def split_outputs(out: Any) -> tuple[Tensor, list[Tensor]]:
    """`(logits, aux_logits)` from a model's output; `aux_logits` is empty in eval mode or without heads.

    Accepts a tensor or a tuple whose first item is the main logits (GoogLeNetOutputs, torchvision's
    InceptionOutputs); None entries (heads absent) are dropped. Aux order is the tuple's order.
    """
    if isinstance(out, Tensor):
        return out, []
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0], [a for a in out[1:] if a is not None]
    raise TypeError(f"expected a logits tensor or a (logits, *aux) tuple, got {type(out).__name__}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / a DeepSpeed engine (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def has_aux(model: nn.Module) -> bool:
    """Whether `model` has auxiliary classifier heads (torchvision's `aux_logits` flag, as in GoogLeNet).

    A structural fact: such a model still returns plain logits in eval mode. Wrappers are looked through.
    """
    return bool(getattr(unwrap_model(model), "aux_logits", False))


def loss_with_aux(
    out: Any,
    target: Tensor,
    criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    aux_weight: float = AUX_LOSS_WEIGHT,
) -> Tensor:
    """main loss + aux_weight * sum of the aux-head losses (just the main loss when there are none)."""
    logits, aux = split_outputs(out)
    loss = criterion(logits, target)
    for a in aux:
        loss = loss + aux_weight * criterion(a, target)
    return loss
