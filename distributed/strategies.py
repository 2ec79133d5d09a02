"""Two ways to run the same loop: `ddp` (DistributedDataParallel) and `deepspeed` (ZeRO 0-3), under one precision
policy (docs/precision.md): fp32 master weights and BatchNorm, gradients all-reduced and accumulated in fp32,
torch autocast to bf16 or fp16 for compute (DeepSpeed's `torch_autocast` section), fp16 with a dynamic loss scale.

The loop calls `set_lr(lr)`, `forward`, `step(loss)`, `eval_forward`, `save(dir, extra, rank)` and `load(dir)`;
it never asks which one it has. `step` returns a 0-dim device tensor, 1 when the optimizer step was applied and
0 when the loss scaler skipped it, so the loop can count skips without a host synchronisation.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distributed import checkpoint as ckpt
from distributed.config import Config, ConfigError, per_rank_batch
from distributed.optim import WeightEma, build_optimizer, set_lr

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DDPStrategy:
    """DistributedDataParallel with torch autocast (bf16, or fp16 with a GradScaler) on GPU or CPU (gloo)."""

    name = "ddp"
    checkpoint_writers = 1  # rank 0 writes the whole state

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
        self.cfg, self.device = cfg, device
        self.dtype = _DTYPES[cfg.strategy.precision]
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.module = model.to(device, memory_format=self.memory_format)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.strategy.precision == "fp16" else None
        self.optimizer = build_optimizer(cfg, self.module, device, scaler=self.scaler is not None)
        self.ema = WeightEma(cfg, self.module, steps_per_epoch) if cfg.optim.ema_decay is not None else None
        wrapped = self.module
        if _world() > 1:
            ids = [device.index] if device.type == "cuda" else None
            # No buffer broadcast before every forward (a collective per step): BN statistics are averaged across
            # ranks before each evaluation and checkpoint instead (comm.reduce_bn, timm's --dist-bn reduce).
            wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids, forward_sync_buffers=False)
        self.wrapped = torch.compile(wrapped, backend=cfg.model.compile_backend) if cfg.model.compile else wrapped
        self._applied = torch.ones((), device=device)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, images: torch.Tensor):
        with self.autocast():
            return self.wrapped(images.contiguous(memory_format=self.memory_format))

    def eval_forward(self, images: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        with self.autocast():
            return (module or self.module)(images.contiguous(memory_format=self.memory_format))

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward and optimizer step; returns 1 (applied) or 0 (the fp16 scaler found inf/NaN gradients)."""
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.optim.grad_clip_norm
        if self.scaler is None:
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            self.optimizer.step()
            return self._applied
        self.scaler.scale(loss).backward()
        if clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.scaler.step(self.optimizer)  # fused optimizers skip on the device; see optim.implementation_kwargs
        # GradScaler's own found-inf flags, on the device; update() forgets them.
        found = sum(self.scaler._found_inf_per_device(self.optimizer).values())
        self.scaler.update()
        return (found == 0).to(self._applied.dtype)

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.after_step(self.module, step)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path, extra: dict, rank: int) -> None:
        if rank != 0:
            return
        state = dict(extra)
        state["model"] = self.module.state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        state["scaler"] = self.scaler.state_dict() if self.scaler else None
        state["ema"] = self.ema.state_dict() if self.ema else None
        ckpt.save_state(directory, state)

    def load(self, directory: Path) -> dict:
        state = ckpt.load_state(directory, verify=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        return state


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed JSON config from the run config; `strategy.deepspeed` entries override (deepspeed.ai/docs/config-json).

    No `bf16`/`fp16` section (they cast the module, BatchNorm buffers included, to half precision): parameters stay
    fp32 and `torch_autocast` runs the compute in bf16/fp16. `lower_precision_safe_modules: []` keeps the gradient
    all-reduce in fp32 (DeepSpeed's default list would reduce Linear/Conv gradients in the autocast dtype); set
    strategy.deepspeed.torch_autocast.lower_precision_safe_modules to choose bf16 communication explicitly.
    """
    ds = {
        "train_micro_batch_size_per_gpu": per_rank_batch(cfg),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.strategy.zero_stage},
        # Our optimizer is plain torch SGD/AdamW; DeepSpeed asks to confirm it for ZeRO.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "steps_per_print": 10**9,
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
    }
    if cfg.strategy.precision != "fp32":
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[cfg.strategy.precision]
        ds["torch_autocast"] = {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    return _merge(ds, cfg.strategy.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-building its shared-memory all-reduce op (about 60 s of C++ in every
    new venv or checkout path, since ninja sees new include paths). The op serves only `inference_all_reduce`;
    training all-reduces go through torch.distributed (gloo on CPU) either way. DeepSpeed keeps the probe's result in
    `deepspeed.ops.__compatible_ops__` and documents that edits to it persist; GPU runs never reach this."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy:
    """deepspeed.initialize with ZeRO stage 0-3; every rank saves its shard with engine.save_checkpoint."""

    name = "deepspeed"
    TAG = "zero"

    def __init__(self, cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
        import deepspeed

        self.cfg, self.device = cfg, device
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        # fp32 (autocast casts per operation). Parameters keep the contiguous layout even with channels_last:
        # DeepSpeed's initial broadcast views each one as bytes (`p.data.view(torch.uint8)`), which raises on
        # channels_last strides; the inputs are still channels_last.
        model = model.to(device)
        self.client_optimizer = build_optimizer(cfg, model, device)
        if device.type == "cpu":
            skip_cpu_shm_comm_build()
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=self.client_optimizer, config=deepspeed_config(cfg), dist_init_required=False)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"DeepSpeed rejected the config (strategy.*): {e}") from e
        self.module = self.engine.module
        self.checkpoint_writers = _world()
        self.ema = None
        self._applied, self._skipped = torch.ones((), device=device), torch.zeros((), device=device)

    def forward(self, images: torch.Tensor):
        return self.engine(images.contiguous(memory_format=self.memory_format))

    def eval_forward(self, images: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        # ZeRO-3 gathers partitioned weights inside the engine's forward, under its torch_autocast.
        return self.engine(images.contiguous(memory_format=self.memory_format))

    def set_lr(self, lr: float) -> None:
        set_lr(self.client_optimizer, lr)  # ZeRO keeps the client optimizer's param_group dicts

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def _scaler(self):
        """The GradScaler DeepSpeed steps with under fp16 torch_autocast (stage 0: the engine's; else ZeRO's)."""
        return getattr(self.engine, "torch_autocast_z0_gradscaler", None) or \
            getattr(self.engine.optimizer, "torch_autocast_gradscaler", None)

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        scaler = self._scaler() if self.cfg.strategy.precision == "fp16" else None
        if scaler is not None:
            scale = scaler._scale
            before = scale.clone() if scale is not None else torch.tensor(scaler.get_scale(), device=self.device)
        skipped = self.engine.skipped_steps
        self.engine.backward(loss)
        self.engine.step()
        if self.engine.skipped_steps != skipped:  # ZeRO found non-finite gradients (DeepSpeed read that itself)
            return self._skipped
        if scaler is None:
            return self._applied
        return (scaler._scale >= before).to(self._applied.dtype)  # an overflow halves the scale (backoff)

    def after_step(self, step: int) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: Path, extra: dict, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=True)
        if rank == 0:
            ckpt.save_state(directory, dict(extra))

    def load(self, directory: Path) -> dict:
        ckpt.check_weights_only(directory)  # DeepSpeed's loader unpickles without weights_only
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ckpt.CheckpointError(f"checkpoint {directory}: DeepSpeed found no '{self.TAG}' state")
        return ckpt.load_state(directory, verify=False)


STRATEGIES = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
    return STRATEGIES[cfg.strategy.name](cfg, model, device, steps_per_epoch)
