"""The training objective from the config: models' `loss_with_aux` (main + aux_weight x auxiliary heads) with
label-smoothed cross-entropy computed in fp32, and the error raised when the loss diverges."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from distributed.config import Config
from models import loss_with_aux


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (outside fp16's ordinary overflow skips): the run diverged."""


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)  # fp32 under autocast too


def compute_loss(cfg: Config, outputs, labels: torch.Tensor) -> torch.Tensor:
    criterion = functools.partial(_cross_entropy, label_smoothing=cfg.optim.label_smoothing)
    return loss_with_aux(outputs, labels, criterion=criterion, aux_weight=cfg.model.aux_weight)
