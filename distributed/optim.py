"""The optimizer, the learning-rate schedule and the EMA of weights, built from the config (torchvision's
references/classification recipe: SGD or AdamW, no decay on norm and bias, linear scaling, warm-up then cosine or
step decay, `--model-ema` with its decay adjustment and warm-up).

The schedule is a pure function of the optimizer steps actually taken (`lr_at`), each a global batch of
`data.global_batch_size` samples, and of steps_per_epoch = N_train // G: neither depends on the number of ranks.
The loop sets the lr before every step, the same way for DDP and DeepSpeed, and a resumed run (at any world size)
recomputes it from the current config and the step count in the checkpoint; no scheduler state is saved or
restored.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from distributed.config import Config


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Norm and bias parameters (ndim <= 1) get no weight decay unless asked (Goyal et al. 2017)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not decay_norm_and_bias else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def global_batch(cfg: Config) -> int:
    """G: fixed for the run whatever the number of ranks (each takes G / ranks), so the lr is too."""
    return cfg.data.global_batch_size


def peak_lr(cfg: Config) -> float:
    """Linear scaling rule: base_lr is per 256 images of global batch (Goyal et al. 2017)."""
    return cfg.optim.base_lr * global_batch(cfg) / 256


def implementation_kwargs(cfg: Config, device: torch.device, scaler: bool) -> dict:
    """torch's foreach/fused switch. "auto": fused on a GPU and whenever a GradScaler steps the optimizer (the
    fused step skips an overflowed step on the device; the unfused one reads found_inf on the host every step),
    else torch's default (foreach on CUDA, a for-loop on CPU)."""
    choice = cfg.optim.implementation
    if choice == "auto":
        choice = "fused" if device.type == "cuda" or scaler else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
            "default": {}}[choice]


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device | None = None,
                    scaler: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norm_and_bias)
    kw = implementation_kwargs(cfg, device or torch.device("cpu"), scaler)
    lr = peak_lr(cfg)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov, **kw)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), **kw)


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, then cosine or step decay."""
    warmup = int(cfg.schedule.warmup_epochs * steps_per_epoch)
    total = cfg.schedule.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule.decay == "step":
        epoch = step / steps_per_epoch
        return cfg.schedule.step_gamma ** sum(epoch >= e for e in cfg.schedule.step_epochs)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.schedule.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(cfg: Config, steps_taken: int, steps_per_epoch: int) -> float:
    """The lr of the next optimizer step, after `steps_taken` applied steps (fp16 overflow skips excluded)."""
    return peak_lr(cfg) * lr_factor(steps_taken, cfg, steps_per_epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightEma:
    """EMA of the weights and buffers as torchvision's reference keeps it (--model-ema): updated every
    `optim.ema_steps` steps with the decay adjusted to the global batch and the epochs,
    alpha = min(1, (1 - ema_decay) x global batch x ema_steps / epochs), and a copy of the weights during the
    lr warm-up. The averaging itself is timm's ModelEmaV3 (foreach lerp on the device, no host sync)."""

    def __init__(self, cfg: Config, model: nn.Module, steps_per_epoch: int):
        from timm.utils import ModelEmaV3

        alpha = min(1.0, (1.0 - cfg.optim.ema_decay) * global_batch(cfg) * cfg.optim.ema_steps / cfg.schedule.epochs)
        self.decay = 1.0 - alpha
        self.every = cfg.optim.ema_steps
        self.warmup_steps = int(cfg.schedule.warmup_epochs * steps_per_epoch)
        self.ema = ModelEmaV3(model, decay=self.decay)
        self.module = self.ema.module

    def after_step(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        if step % self.every:
            return
        if step <= self.warmup_steps:
            self.ema.set(model)  # torchvision resets the average during warm-up: the EMA follows the weights
        else:
            self.ema.update(model)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
