"""Run configuration: one frozen dataclass per concern, loaded from YAML, then dotted command-line overrides.

`load_config("configs/demo.yaml", ["optim.base_lr=0.2"])` returns a `Config`; unknown keys and wrong types
raise `ConfigError` naming the key and listing the valid ones (timm's YAML-then-CLI habit, nanoGPT's
dataclass config).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from data.options import DECODERS
from data.order import valid_world_sizes


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what would be valid."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "se_googlenet"
    # Extra keyword arguments for models.get_model, e.g. {se_placement: module}.
    kwargs: dict = field(default_factory=dict)
    # GoogLeNet paper (Szegedy et al. 2014, sec. 5): auxiliary losses are added with weight 0.3.
    aux_weight: float = 0.3
    # NHWC helps convolutions on tensor-core GPUs (PyTorch memory-format tutorial); neutral on CPU.
    channels_last: bool = False
    # torch.compile the model (GPU runs; compile time dominates short CPU runs). DDP only.
    compile: bool = False
    # torch.compile's backend: "inductor" (generated kernels), or e.g. "aot_eager" (graph capture only).
    compile_backend: str = "inductor"


@dataclass(frozen=True)
class DataConfig:
    # Shards written by `python -m jobs.prepare` (any fsspec URL: local path, s3://, gs://).
    url: str = "demo_data/shards"
    image_size: int = 224
    # Samples per optimizer step over all ranks (G), fixed for a run: each of the ranks present takes
    # G / ranks (the rank count must divide G). With run.seed and shuffle_buffer_mb it defines the training
    # order (data/order.py), which no rank or loader-worker count changes; the lr follows it (optim.base_lr).
    global_batch_size: int = 256
    eval_batch_size: int = 128  # per rank
    loader_workers: int = 4
    # Raw sample bytes the whole job holds for shuffling and read-ahead, each rank its share (budget / ranks):
    # two windows per slot stream, so the shuffle window = budget / (2 x G x mean sample size). Used by
    # data.TrainLoader; ImageNet at G=1024: 4096 MB gives 19-sample windows and 512 MB per rank on 8 ranks.
    shuffle_buffer_mb: float = 1024.0
    # RandomResizedCrop's area range; (0.08, 1) is the Inception/torchvision default for ImageNet.
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    # None, "randaugment" or "trivialaugment" (torchvision references' --auto-augment).
    auto_augment: str | None = None
    # Above this fraction of undecodable images the run stops with the offending keys.
    max_corrupt_fraction: float = 0.01
    # Where training images are decoded (data.TrainLoader): "cpu" = loader workers decode only what the crop needs;
    # "gpu" = loader workers batch compressed bytes + crops, the training process decodes them (batched nvJPEG,
    # data.device_batch): for GPU nodes with few CPU cores per GPU (docs/data_pipeline.md). Same order and crops.
    decode: str = "cpu"


def validate_data(data: DataConfig) -> None:
    """Value checks of the data section, each naming its key."""
    for key in ("image_size", "global_batch_size", "eval_batch_size", "shuffle_buffer_mb"):
        if getattr(data, key) <= 0:
            raise ConfigError(f"config key 'data.{key}' must be > 0, got {getattr(data, key)}")
    if data.loader_workers < 0:
        raise ConfigError(f"config key 'data.loader_workers' must be >= 0, got {data.loader_workers}")
    if not 0 <= data.max_corrupt_fraction <= 1:
        raise ConfigError(f"config key 'data.max_corrupt_fraction' must lie in [0, 1], got {data.max_corrupt_fraction}")
    scale = data.crop_scale
    if (len(scale) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
            or not 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"config key 'data.crop_scale' must be [low, high] with 0 < low <= high <= 1, got {scale}")
    if data.decode not in DECODERS:
        raise ConfigError(f"config key 'data.decode' is {data.decode!r}; valid: {', '.join(map(repr, DECODERS))}")
    if data.decode == "gpu" and data.auto_augment is not None:
        raise ConfigError(f"config key 'data.auto_augment' ({data.auto_augment!r}) needs data.decode 'cpu': it runs "
                          "on decoded images in the loader workers; set data.auto_augment to null for data.decode 'gpu'")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # "sgd" or "adamw"
    # Learning rate per 256 images; the run uses base_lr * global_batch / 256 (Goyal et al. 2017, linear scaling).
    base_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    # No weight decay on norm and bias parameters (Goyal et al. 2017; torchvision references --norm-weight-decay 0).
    decay_norm_and_bias: bool = False
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # Szegedy et al. 2016 (Inception-v3) label smoothing; torchvision's recipes use 0.1.
    label_smoothing: float = 0.1
    grad_clip_norm: float | None = None
    # EMA of weights, torchvision references' --model-ema-decay (0.99998 there; None disables): the decay per
    # update is adjusted to the global batch, ema_steps and epochs (distributed/optim.py WeightEma).
    ema_decay: float | None = None
    # Update the EMA every this many optimizer steps (torchvision --model-ema-steps).
    ema_steps: int = 32
    # torch optimizer kernels: "auto" (fused on GPU and with fp16's GradScaler, else torch's default), "fused",
    # "foreach" or "for_loop". See docs/training.md, "GPU checklist".
    implementation: str = "auto"


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 90
    # Linear warm-up from 0 (Goyal et al. 2017: 5 epochs for large batches).
    warmup_epochs: float = 5.0
    decay: str = "cosine"  # "cosine" (Loshchilov & Hutter 2017) or "step"
    step_epochs: list = field(default_factory=lambda: [30, 60, 80])
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "ddp"  # "ddp" or "deepspeed"
    # "fp32", "bf16" or "fp16" (fp16 needs a GPU: GradScaler for ddp, dynamic loss scaling for deepspeed).
    precision: str = "fp32"
    zero_stage: int = 0
    # Extra DeepSpeed config entries merged over the generated ones (deepspeed.ai/docs/config-json).
    deepspeed: dict = field(default_factory=dict)
    # fp16: consecutive overflow-skipped steps tolerated before the run stops as diverged.
    max_skipped_steps: int = 25
    # TF32 for fp32 matmuls and convolutions on Ampere and newer GPUs (10-bit mantissa, 8x the fp32 rate).
    tf32: bool = True


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"
    # Ray Train storage: local path, s3://bucket/prefix or gs://bucket/prefix.
    storage_path: str = "runs"
    # Ranks (Ray Train workers): a count, or a range "min,max" (a 2-list in YAML) for Ray Train's elastic scaling:
    # the run starts with what the cluster has and is restarted at another size when that changes. Every count
    # of the range must divide data.global_batch_size (docs/fault_tolerance.md, "Elastic runs").
    num_workers: int | str | list = 2
    # Elastic runs: how often Ray Train checks whether the cluster fits another rank count (a grow is a restart from
    # the newest checkpoint). Ray's ScalingConfig.elastic_resize_monitor_interval_s.
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    # Ray CPUs per rank (and torch threads, at least 1); a fraction packs more ranks than cores (tests: 3 ranks on 2).
    cpus_per_worker: float = 1
    checkpoint_every_steps: int = 500
    # Evaluated checkpoints kept (the best by score); Ray keeps the latest checkpoint too.
    num_to_keep: int = 3
    # Which weights' val top-1 scores a checkpoint: "raw" or "ema" (needs optim.ema_decay).
    checkpoint_score: str = "raw"
    max_failures: int = 3
    log_every_steps: int = 50
    seed: int = 0
    # Deterministic kernels and per-step RNG seeding, so an interrupted+resumed CPU run equals an uninterrupted one.
    deterministic: bool = False
    # Ray cluster address; empty means $RAY_ADDRESS, else a local Ray on 127.0.0.1.
    address: str | None = None
    # Test hook: stop cleanly (without error) after this many global steps; None = run to the end.
    stop_after_steps: int | None = None
    # Test hook: a local folder where each rank appends the keys it trains, per step (distributed.loop.SampleLog).
    sample_log: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_workers", _worker_counts(self.num_workers))


def _worker_counts(value: int | str | list) -> int | list:
    """run.num_workers as given -> an int, or [min, max] for an elastic range ("2,8", [2, 8]; "4" -> 4)."""
    raw = value
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError:
            value = None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value) and 0 < value[0] <= value[1]):
        return value if value[0] < value[1] else value[0]
    raise ConfigError(f"config key 'run.num_workers' must be a count > 0 or a range 'min,max' (YAML: [min, max]) "
                      f"with 0 < min <= max, got {raw!r}")


def worker_range(run: RunConfig) -> tuple[int, int]:
    """(min, max) ranks: equal for a fixed count."""
    n = run.num_workers
    return (n, n) if isinstance(n, int) else (n[0], n[1])


def per_rank_batch(cfg: "Config", world: int | None = None) -> int:
    """G / world; `world` defaults to the fixed run.num_workers (DeepSpeed's micro batch, which has no range)."""
    world = world or worker_range(cfg.run)[0]
    return cfg.data.global_batch_size // world


def check_worker_counts(cfg: "Config") -> None:
    """Every rank count the run may have must divide the global batch (data.order.check_world): all of min..max,
    since Ray Train's elastic policy may start or restart the run at any size in the range."""
    lo, hi = worker_range(cfg.run)
    g = cfg.data.global_batch_size
    bad = [n for n in range(lo, hi + 1) if g % n]
    if bad:
        valid = valid_world_sizes(g)
        inside = [n for n in valid if lo <= n <= hi]
        raise ConfigError(f"config key 'run.num_workers' = {cfg.run.num_workers!r}: data.global_batch_size={g} "
                          f"cannot be split evenly over {', '.join(map(str, bad[:8]))} ranks; every count of the "
                          f"range must divide it. Valid counts: {', '.join(map(str, valid[:16]))}"
                          + (f" (in the range: {', '.join(map(str, inside))})" if inside and lo < hi else "")
                          + "; or choose a global batch with more divisors (e.g. 240 for 1-6 ranks, 840 for 1-8)")


@dataclass(frozen=True)
class TrackingConfig:
    # "none", or "mlflow" (the `tracking` extra: mlflow-skinny): rank 0 logs params, metrics, summary and curves.
    backend: str = "none"
    # MLflow tracking URI: a server (http://host:5000) or a local folder / file:// URI (MLflow's file store).
    # None: $MLFLOW_TRACKING_URI, else MLflow's default.
    uri: str | None = None
    experiment: str = "imagenet-ray"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # A checkpoint URL to start from when the run has none of its own.
    resume_from: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys of older versions and what replaced them: named in the unknown-key error.
RENAMED = {
    "data.batch_size": "data.global_batch_size, the samples per step over all ranks: the old data.batch_size x "
                       "run.num_workers",
    "data.shuffle_buffer": "data.shuffle_buffer_mb, the shuffle budget of the whole job in MB",
}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError("; ".join(errors))
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if expected in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {expected.__name__}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"config key '{key}': expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        hint = f" (replaced by {RENAMED[key]})" if key in RENAMED else ""
        raise ConfigError(
            f"unknown config key '{key}'{hint}; valid keys here: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.base_lr=0.2' -> ('optim.base_lr', 0.2); the value is read as YAML (numbers, bools, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. optim.base_lr=0.2")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or the defaults when path is None) and apply `key=value` overrides."""
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        cfg = config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'defaults'}: {e}") from None
    validate(cfg)
    return cfg


_CHOICES = {
    "optim.name": ("sgd", "adamw"),
    "schedule.decay": ("cosine", "step"),
    "strategy.name": ("ddp", "deepspeed"),
    "strategy.precision": ("fp32", "bf16", "fp16"),
    "strategy.zero_stage": (0, 1, 2, 3),
    "data.auto_augment": (None, "randaugment", "trivialaugment"),
    "tracking.backend": ("none", "mlflow"),
    "optim.implementation": ("auto", "fused", "foreach", "for_loop"),
    "run.checkpoint_score": ("raw", "ema"),
}
# DeepSpeed keys the generated config owns: precision is strategy.precision (torch autocast, fp32 master weights),
# the lr schedule is ours (distributed/optim.py), the optimizer is optim.*.
_DEEPSPEED_OWNED = {"bf16": "strategy.precision", "fp16": "strategy.precision", "scheduler": "schedule.*",
                    "optimizer": "optim.*", "amp": "strategy.precision"}


def validate(cfg: Config) -> None:
    """Value checks beyond types: choices and ranges, each naming its key."""
    tree = cfg.to_dict()
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        if tree[section][key] not in choices:
            raise ConfigError(f"config key '{dotted}' = {tree[section][key]!r}; valid: {', '.join(map(repr, choices))}")
    validate_data(cfg.data)
    positive = ["run.checkpoint_every_steps", "run.log_every_steps", "schedule.epochs",
                "run.cpus_per_worker", "run.elastic_resize_interval_s"]
    for dotted in positive:
        section, key = dotted.split(".")
        if tree[section][key] <= 0:
            raise ConfigError(f"config key '{dotted}' must be > 0, got {tree[section][key]}")
    check_worker_counts(cfg)
    if cfg.strategy.name == "deepspeed" and not isinstance(cfg.run.num_workers, int):
        raise ConfigError(f"config key 'run.num_workers' = {cfg.run.num_workers!r}: a range (elastic) needs "
                          "strategy.name=ddp; DeepSpeed's ZeRO checkpoints are per rank and load at their own size only")
    if cfg.strategy.name == "ddp" and cfg.strategy.zero_stage:
        raise ConfigError("config key 'strategy.zero_stage' needs strategy.name=deepspeed")
    for dotted, value in (("optim.ema_decay", cfg.optim.ema_decay), ("model.compile", cfg.model.compile or None)):
        if cfg.strategy.name == "deepspeed" and value is not None:
            raise ConfigError(f"config key '{dotted}' is supported with strategy.name=ddp only")
    if cfg.run.checkpoint_score == "ema" and cfg.optim.ema_decay is None:
        raise ConfigError("config key 'run.checkpoint_score' = 'ema' needs optim.ema_decay (EMA weights to score)")
    if cfg.optim.ema_steps <= 0:
        raise ConfigError(f"config key 'optim.ema_steps' must be > 0, got {cfg.optim.ema_steps}")
    if cfg.strategy.name == "deepspeed" and cfg.strategy.precision == "fp16" and cfg.strategy.zero_stage > 0:
        # DeepSpeed 0.19.8, ZeRO 1-3 under torch_autocast: the optimizer finds the overflow in its gradient norm and
        # returns before its GradScaler steps, so the loss scale never backs off and every later step is skipped.
        raise ConfigError(f"strategy.precision=fp16 with strategy.name=deepspeed needs strategy.zero_stage=0 (got "
                          f"{cfg.strategy.zero_stage}): DeepSpeed's ZeRO 1-3 never lowers the fp16 loss scale under "
                          "torch autocast; use strategy.precision=bf16, zero_stage=0, or strategy.name=ddp")
    validate_deepspeed_section(cfg)
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"config key 'run.name' must be a non-empty name without '/', got {cfg.run.name!r}")


def validate_deepspeed_section(cfg: Config) -> None:
    """Gradient accumulation is refused (the loop steps the optimizer every batch and scales the lr by the
    global batch of one step), and so are the sections the generated config owns."""
    ds = cfg.strategy.deepspeed
    for key, owner in _DEEPSPEED_OWNED.items():
        if key in ds:
            raise ConfigError(f"config key 'strategy.deepspeed.{key}' is not accepted: set {owner} instead")
    steps = ds.get("gradient_accumulation_steps", 1)
    if steps != 1:
        raise ConfigError(f"config key 'strategy.deepspeed.gradient_accumulation_steps' = {steps!r}: gradient "
                          "accumulation is not supported (the loop steps every batch and its lr and schedule "
                          "assume it); raise data.global_batch_size instead")
    global_batch = cfg.data.global_batch_size
    if "train_batch_size" in ds and ds["train_batch_size"] != global_batch:
        raise ConfigError(f"config key 'strategy.deepspeed.train_batch_size' = {ds['train_batch_size']!r} must equal "
                          f"data.global_batch_size = {global_batch} (no gradient accumulation); leave it out")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
