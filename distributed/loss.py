"""The training objective (main + 0.3 x auxiliary heads) and the divergence check."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distributed.config import Config
from models import split_outputs


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (outside fp16's ordinary overflow skips): the run diverged."""


def compute_loss(cfg: Config, outputs, labels: torch.Tensor) -> torch.Tensor:
    logits, aux = split_outputs(outputs)
    smoothing = cfg.optim.label_smoothing
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    for a in aux:
        loss = loss + cfg.model.aux_weight * F.cross_entropy(a.float(), labels, label_smoothing=smoothing)
    return loss


def check_loss(cfg: Config, loss: torch.Tensor, applied: bool, state) -> float:
    """Stop, naming step and loss, when the loss turns non-finite beyond fp16's ordinary overflow skips."""
    value = loss.item()
    fp16 = cfg.strategy.precision == "fp16"
    state.skipped_steps = 0 if applied else state.skipped_steps + 1
    if not math.isfinite(value) and not fp16:
        raise NonFiniteLossError(
            f"loss is {value} at step {state.step} (epoch {state.epoch}, batch {state.batch}): training diverged. "
            "Lower optim.base_lr, raise schedule.warmup_epochs or set optim.grad_clip_norm.")
    if state.skipped_steps > cfg.strategy.max_skipped_steps:
        raise NonFiniteLossError(
            f"{state.skipped_steps} fp16 steps in a row overflowed up to step {state.step} (last loss {value}): "
            "training diverged beyond what loss scaling absorbs.")
    return value
