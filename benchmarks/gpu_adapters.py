"""The device check's only couplings to the project's strategy, loader, checkpoint and data-preparation code.

One small function per piece, so that when an interface changes (the strategies, the stream and the shard
index are being reworked) the fix is made here, once. Nothing imported here pulls in Ray: the device machine
has none (distributed/loop.py imports it; config, strategies, loss, checkpoint, data/ and models/ do not).
"""
from __future__ import annotations

import importlib
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distributed import checkpoint as ckpt
from distributed.config import Config, load_config
from distributed.loss import compute_loss
from distributed.strategies import build_strategy as _build_strategy
from models import get_model, unwrap_model


def make_config(model: str, precision: str, batch: int, image_size: int, *, channels_last: bool = True,
                compile: bool = False, strategy: str = "ddp", zero_stage: int = 0, epochs: int = 90,
                warmup_epochs: float = 0.0, seed: int = 0, url: str = "unused") -> Config:
    """A one-process run config (run.num_workers=1: the learning rate is the per-256 base rate x batch / 256)."""
    overrides = [f"model.name={model}", f"strategy.precision={precision}", f"data.global_batch_size={batch}",
                 f"data.image_size={image_size}", f"model.channels_last={str(channels_last).lower()}",
                 f"model.compile={str(compile).lower()}", f"strategy.name={strategy}",
                 f"strategy.zero_stage={zero_stage}", f"schedule.epochs={epochs}",
                 f"schedule.warmup_epochs={warmup_epochs}", f"run.seed={seed}", "run.num_workers=1",
                 f"data.url={url}"]
    return load_config(None, overrides)


def build_model(cfg: Config, num_classes: int = 1000) -> nn.Module:
    """Fresh weights from the run seed, as every rank of a training run builds them."""
    torch.manual_seed(cfg.run.seed)
    return get_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)


def build_strategy(cfg: Config, model: nn.Module, device: torch.device, steps_per_epoch: int):
    return _build_strategy(cfg, model, device, steps_per_epoch)


def wrap_ddp_world1(strategy, device: torch.device) -> None:
    """Put DistributedDataParallel around the model at world size 1 (the strategy itself wraps only at > 1),
    so the measured step includes DDP's gradient buckets and their all-reduce."""
    ids = [device.index or 0] if device.type == "cuda" else None
    strategy.wrapped = nn.parallel.DistributedDataParallel(strategy.module, device_ids=ids)


def train_step(cfg: Config, strategy, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, loss (main + aux heads), backward and optimizer step, as the training loop runs them."""
    loss = compute_loss(cfg, strategy.forward(images), labels)
    strategy.step(loss)
    return loss


def save_checkpoint(strategy, directory: Path, extra: dict) -> dict:
    """The loop's save: every writing rank saves its part, then its manifest; returns seconds and bytes."""
    t0 = time.perf_counter()
    strategy.save(Path(directory), dict(extra), 0)
    ckpt.write_manifest(directory, 0, 1, writers=strategy.checkpoint_writers)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    return {"seconds": seconds, "bytes": size}


def load_checkpoint(strategy, directory: Path) -> dict:
    """Verify the manifests, restore model/optimizer/scheduler/scaler; returns the saved extra state."""
    ckpt.verify_checkpoint(directory)
    return strategy.load(Path(directory))


def model_state(strategy) -> dict[str, torch.Tensor]:
    """Floating-point tensors of the bare model's state_dict, on the CPU in float64 (for comparisons)."""
    state = unwrap_model(strategy.module).state_dict()
    return {k: v.detach().double().cpu() for k, v in state.items() if v.is_floating_point()}


def write_jpeg_shards(url: str, images: int, unique: int, per_shard: int) -> dict:
    """Shards of ImageNet-like JPEGs (500x375, quality 90; benchmarks.data_pipeline), `unique` of them cycled:
    decoding costs the same whether or not the bytes repeat."""
    from benchmarks.data_pipeline import make_jpegs, write_shard_dataset

    jpegs = make_jpegs(min(images, unique))
    cycled = [jpegs[i % len(jpegs)] for i in range(images)]
    write_shard_dataset(url, cycled, per_shard)
    return {"images": images, "unique_jpegs": len(jpegs), "bytes_per_image": sum(map(len, cycled)) / images,
            "jpeg": "500x375, quality 90 (benchmarks.data_pipeline.make_jpegs)"}


def make_sample_shards(workdir: Path, classes: int, per_class: int) -> dict:
    """The project's generated sample dataset (jobs.make_sample) prepared into shards (jobs.prepare)."""
    from data import make_sample, prepare_dataset, read_index

    raw, shards = str(workdir / "raw"), str(workdir / "shards")
    make_sample(raw, classes=classes, per_class=per_class, val_per_class=2, test=0)
    prepare_dataset(raw, shards, shard_size=max(1, classes * per_class // 4), splits=("train", "val"),
                    log=lambda line: None)
    index = read_index(shards)
    return {"url": shards, "train_samples": index.splits["train"].samples, "classes": len(index.classes)}


def train_loader(url: str, *, batch: int, image_size: int, workers: int, seed: int = 0, epoch: int = 0,
                 start_batch: int = 0, decode: str = "cpu"):
    """One rank's (world 1) batches of `data.TrainLoader` for an epoch from `start_batch`: global batch `batch`,
    augmentation on, exact resume. decode="cpu": uint8 images decoded crop first in the loader workers;
    decode="gpu": compressed bytes + crops, decoded by `to_device` on the device. The loader closes with the
    iterator."""
    from data import StreamOptions, TrainLoader

    opts = StreamOptions(url, image_size=image_size, global_batch_size=batch, loader_workers=workers, seed=seed,
                         decode=decode)
    loader = TrainLoader(opts, 0, 1)
    try:
        yield from loader.epoch(epoch, start_batch)
    finally:
        loader.close()


def to_device(batch: dict, device: torch.device, channels_last: bool,
              image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch as the loop feeds it (`data.device_batch`, either decode mode): normalised float images and
    int64 labels on the device. `image_size` is needed for decode="gpu" batches only."""
    from data import device_batch

    if image_size is None and "crop" in batch:
        raise ValueError("a decode='gpu' batch needs image_size (the output side of the device decode)")
    out = device_batch(batch, device, image_size or 0, channels_last)
    return out["image"], out["label"]


def gpu_decode_status() -> dict:
    """Which GPU-decode path this branch has: `data.TrainLoader(decode="gpu")` + `data.device_batch` (batched nvJPEG
    through `data.gpu_decode.decode_batch`, issue 12). The check drives it when present."""
    status: dict = {"data.gpu_decode": "absent", "path": None}
    try:
        module = importlib.import_module("data.gpu_decode")
    except ImportError:
        return status
    status["data.gpu_decode"] = "present"
    status["data.gpu_decode_names"] = sorted(n for n in dir(module) if not n.startswith("_"))
    from data.options import DECODERS

    if "gpu" in DECODERS and hasattr(module, "device_batch"):
        status["path"] = "TrainLoader(decode='gpu'): loader workers batch bytes + crops; device_batch: batched nvJPEG"
    return status


def init_process_group(device: torch.device) -> str:
    """A world of one on 127.0.0.1 (nccl on CUDA, gloo on CPU), as Ray Train would set it up per rank."""
    if dist.is_initialized():
        return dist.get_backend()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    return backend


def deepspeed_version(import_it: bool = True) -> str | None:
    """DeepSpeed's version if it is installed (imported, unless `import_it` is False: the import takes seconds)."""
    if not import_it:
        from importlib import metadata, util

        return metadata.version("deepspeed") if util.find_spec("deepspeed") else None
    try:
        return importlib.import_module("deepspeed").__version__
    except ImportError:
        return None


def seed_step(cfg: Config, step: int, rank: int = 0) -> None:
    """The loop's deterministic-mode seeding (distributed/loop.py seed_step): dropout masks depend on the step."""
    torch.manual_seed((cfg.run.seed * 1_000_003 + step) * 1024 + rank)
