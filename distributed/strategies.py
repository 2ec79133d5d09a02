"""Two ways to run the same loop: `ddp` (DistributedDataParallel + AMP) and `deepspeed` (ZeRO 0-3, fp16/bf16).

The loop calls `forward`, `step(loss)`, `save(dir, extra)` and `load(dir)`; it never asks which one it has.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distributed import checkpoint as ckpt
from distributed.config import Config, ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Norm and bias parameters (ndim <= 1) get no weight decay unless asked (Goyal et al. 2017)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not decay_norm_and_bias else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: Config) -> float:
    """Linear scaling rule: base_lr is per 256 images of global batch (Goyal et al. 2017)."""
    return cfg.optim.base_lr * cfg.data.batch_size * cfg.run.num_workers / 256


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_norm_and_bias)
    lr = peak_lr(cfg)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas))


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine or step decay."""
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


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    # A plain function: LambdaLR then keeps only plain numbers in its state_dict (loadable with weights_only).
    def factor(step: int) -> float:
        return lr_factor(step, cfg, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class DDPStrategy:
    """DistributedDataParallel; AMP fp16 with GradScaler or bf16 autocast on GPU, fp32/bf16 on CPU (gloo)."""

    name = "ddp"
    checkpoint_writers = 1  # rank 0 writes the whole state

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
        precision = cfg.strategy.precision
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("strategy.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.cfg, self.device = cfg, device
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.module = model.to(device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(cfg, self.module)
        self.scheduler = build_scheduler(cfg, self.optimizer, steps_per_epoch)
        self.dtype = _DTYPES[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.ema = None
        if cfg.optim.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.module, decay=cfg.optim.ema_decay)
        wrapped = self.module
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.wrapped = torch.compile(wrapped) if cfg.model.compile else wrapped

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, images: torch.Tensor):
        with self.autocast():
            return self.wrapped(images.contiguous(memory_format=self.memory_format))

    def eval_forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.module(images.contiguous(memory_format=self.memory_format))

    def step(self, loss: torch.Tensor) -> bool:
        """Backward and optimizer step; False when the fp16 scaler skipped the step (overflow)."""
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.optim.grad_clip_norm
        if self.scaler is None:
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            self.optimizer.step()
            applied = True
        else:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale
        self.scheduler.step()
        if applied and self.ema is not None:
            self.ema.update(self.module)
        return applied

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path, extra: dict, rank: int) -> None:
        if rank != 0:
            return
        state = dict(extra)
        state["model"] = self.module.state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        state["scheduler"] = self.scheduler.state_dict()
        state["scaler"] = self.scaler.state_dict() if self.scaler else None
        state["ema"] = self.ema.module.state_dict() if self.ema else None
        ckpt.save_state(directory, state)

    def load(self, directory: Path) -> dict:
        state = ckpt.load_state(directory, verify=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.module.load_state_dict(state["ema"])
        return state


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed JSON config from the run config; `strategy.deepspeed` entries override (deepspeed.ai/docs/config-json)."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.strategy.zero_stage},
        # Our optimizer is plain torch SGD/AdamW; DeepSpeed asks to confirm it for ZeRO.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "steps_per_print": 10**9,
    }
    if cfg.strategy.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.strategy.precision == "fp16":
        # Dynamic loss scaling (loss_scale 0), DeepSpeed's defaults otherwise.
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return _merge(ds, cfg.strategy.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedStrategy:
    """deepspeed.initialize with ZeRO stage 0-3; every rank saves its shard with engine.save_checkpoint."""

    name = "deepspeed"
    TAG = "zero"

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
        import deepspeed

        if cfg.strategy.precision == "fp16" and device.type != "cuda":
            raise ConfigError("strategy.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16)")
        self.cfg, self.device = cfg, device
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.dtype = _DTYPES[cfg.strategy.precision]
        # DeepSpeed casts parameters for bf16/fp16 but not BatchNorm's running statistics; cast the whole
        # module so BN buffers match (its optimizer keeps fp32 master weights). Parameters keep the contiguous
        # layout even with channels_last: DeepSpeed's initial broadcast views each one as bytes
        # (`p.data.view(torch.uint8)`), which raises on channels_last strides; the inputs stay channels_last.
        model = model.to(device, dtype=self.dtype)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
        try:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
                dist_init_required=False)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"DeepSpeed rejected the config (strategy.*): {e}") from e
        self.module = self.engine.module
        self.checkpoint_writers = dist.get_world_size() if dist.is_initialized() else 1
        self.ema = None
        self.scaler = None

    def forward(self, images: torch.Tensor):
        return self.engine(images.to(self.dtype).contiguous(memory_format=self.memory_format))

    eval_forward = forward  # ZeRO-3 gathers partitioned weights inside the engine's forward

    def step(self, loss: torch.Tensor) -> bool:
        skipped = self.engine.skipped_steps
        self.engine.backward(loss)
        self.engine.step()
        return self.engine.skipped_steps == skipped

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path, extra: dict, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=True)
        if rank == 0:
            ckpt.save_state(directory, dict(extra))

    def load(self, directory: Path) -> dict:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ckpt.CheckpointError(f"checkpoint {directory}: DeepSpeed found no '{self.TAG}' state")
        return ckpt.load_state(directory, verify=False)


STRATEGIES = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
    return STRATEGIES[cfg.strategy.name](cfg, model, device, steps_per_epoch)
