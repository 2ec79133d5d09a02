"""The measurements of the device check, one function per kind of part; `run_part` dispatches by kind.

Each part builds what it needs through `benchmarks.gpu_adapters`, respects the monotonic `deadline` it is
given (timed loops stop there; a part that cannot time one step raises `SkipPart`), and returns a JSON-able
dict. Throughput = batch x timed steps / seconds between two device synchronisations, after warm-up steps
(the first one includes cuDNN's autotuning; `torch.backends.cudnn.benchmark` is on, as in training).
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import gpu_adapters as adapt
from benchmarks.gpu_context import (Context, SkipPart, need_cuda, peak_memory_gib, rate_result, reset_memory,
                                    synthetic_batch, time_steps)
from benchmarks.gpu_resume import part_resume


# -- parts --------------------------------------------------------------------------------------------------

def part_env(ctx: Context, deadline: float) -> dict:
    """Versions, device, the peak table entry, a measured matmul rate and the model FLOPs."""
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "device": ctx.device_name(),
            "cpu_count": os.cpu_count(), "deepspeed": adapt.deepspeed_version(import_it=False),
            "gpu_decode": adapt.gpu_decode_status(), "commit": _commit(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2**30)
    info["peaks"] = {p: ctx.peak(p) for p in ("fp32", "bf16", "fp16")}
    info["matmul_tflops"] = _matmul_tflops(ctx)
    image_size = ctx.settings["image_size"]
    info["flops"] = {m: ctx.flops(m, image_size) for m in ctx.settings["models"]}
    return info


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here; set GPU_CHECK_COMMIT)"


def _matmul_tflops(ctx: Context) -> dict:
    """A square matmul's rate: the card's practical ceiling beside its datasheet peak."""
    cuda = ctx.device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (256, torch.float32, 3)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(3):
        a @ b
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    ctx.sync()
    seconds = (time.perf_counter() - t0) / reps
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / seconds / 1e12}


def part_train(ctx: Context, deadline: float, model: str, precision: str, channels_last: bool, compile: bool,
               batch: int, checkpoint: bool = False) -> dict:
    """Training images/s and MFU with synthetic tensors on the device; compile time apart; checkpoint save."""
    if precision == "fp16":
        need_cuda(ctx, "fp16 with a GradScaler needs a GPU (DDPStrategy refuses it on a CPU)")
    if compile and ctx.smoke:
        raise SkipPart("smoke mode: torch.compile's first (inductor) compile takes minutes on a CPU; "
                       "it runs in a full check on the GPU")
    size = ctx.settings["image_size"]
    cfg = adapt.make_config(model, precision, batch, size, channels_last=channels_last, compile=compile)
    reset_memory(ctx)
    strategy = adapt.build_strategy(cfg, adapt.build_model(cfg), ctx.device, steps_per_epoch=1000)
    strategy.train(True)
    images, labels = synthetic_batch(ctx, batch, size)

    def step():
        adapt.train_step(cfg, strategy, images, labels)

    timing = time_steps(ctx, step, ctx.settings["warmup"], ctx.settings["steps"], deadline)
    out = rate_result(ctx, model, precision, batch, size, timing)
    out.update(channels_last=channels_last, compile=compile, peak_memory_gib=peak_memory_gib(ctx))
    if compile:
        out["compile_s"] = timing["first_step_s"]  # the first step traces and compiles forward and backward
    if checkpoint:
        out["checkpoint"] = checkpoint_save(strategy)
    return out


def checkpoint_save(strategy) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-check-ckpt-") as d:
        saved = adapt.save_checkpoint(strategy, Path(d), {"step": 0})
    return {"save_s": saved["seconds"], "mb": saved["bytes"] / 2**20, "where": "local disk (tempfile)"}


def part_input(ctx: Context, deadline: float, decode: str, model: str, precision: str, batch: int) -> dict:
    """The real input path from shards made on the spot: loader alone, then loader + training step."""
    status = None
    if decode != "cpu":
        need_cuda(ctx, "GPU (nvJPEG) decoding needs a GPU")
        status = adapt.gpu_decode_status()
        if status["path"] is None:
            raise SkipPart(f"no GPU decode path on this branch ({status})")
    shards = input_shards(ctx)
    workers = ctx.settings["loader_workers"]  # decode="gpu": they read and batch bytes + crops, CUDA-free
    size = ctx.settings["image_size"]
    kw = dict(batch=batch, image_size=size, workers=workers, decode=decode)
    half = time.monotonic() + 0.4 * (deadline - time.monotonic())
    t0 = time.perf_counter()
    cfg = adapt.make_config(model, precision, batch, size)

    def decoded(b):  # decode="gpu": the loader's output is bytes; "loader alone" includes the decode on the device
        if decode != "cpu":
            adapt.to_device(b, ctx.device, cfg.model.channels_last, size)

    loader_only = _drain(ctx, iter(adapt.train_loader(shards["url"], **kw)), half, decoded, workers)
    loader_only["first_batch_s"] = loader_only.pop("first_s")
    strategy = adapt.build_strategy(cfg, adapt.build_model(cfg), ctx.device, steps_per_epoch=1000)
    strategy.train(True)

    def step(b):
        adapt.train_step(cfg, strategy, *adapt.to_device(b, ctx.device, cfg.model.channels_last, size))

    trained = _drain(ctx, iter(adapt.train_loader(shards["url"], **kw)), deadline, step, workers)
    out = {"decode": decode, "gpu_decode": status, "loader_workers": workers, "model": model,
           "precision": precision, "batch": batch, "image_size": size, "shards": shards,
           "loader_only": loader_only, "train": trained, "images_per_s": trained["images_per_s"],
           "seconds_total": time.perf_counter() - t0}
    synthetic = ctx.result_of(f"train/{model}/{precision}/cl/eager")
    if synthetic and synthetic["batch"] == batch:
        out["vs_synthetic"] = trained["images_per_s"] / synthetic["images_per_s"]
    return out


def input_shards(ctx: Context) -> dict:
    """Shards for the input parts, made once per check run (reused across child processes)."""
    import json

    root = ctx.workdir / "input_shards"
    meta = root / "_made.json"
    if meta.exists():
        return json.loads(meta.read_text())
    s = ctx.settings
    made = adapt.write_jpeg_shards(str(root), s["input_images"], s["input_unique"], s["input_per_shard"])
    made["url"] = str(root)
    meta.write_text(json.dumps(made))
    return made


def _drain(ctx: Context, batches, deadline: float, step, workers: int) -> dict:
    """Pull batches (stepping on each) until the loader or the time ends; time after the ramp-up batches."""
    t_start = time.perf_counter()
    first = next(batches)
    step(first)
    first_s = time.perf_counter() - t_start
    ramp = max(1, workers + 1)  # every loader worker's first batch arrives together: skip past them
    seen = 1
    for b in batches:
        seen += 1
        if seen <= ramp:
            step(b)
            if time.monotonic() > deadline:
                break
            continue
        if seen == ramp + 1:
            ctx.sync()
            t0, images, timed = time.perf_counter(), 0, 0
        step(b)
        images += len(b["label"])
        timed += 1
        if time.monotonic() > deadline:
            break
    if seen <= ramp + 1:
        raise SkipPart(f"only {seen} batches before the loader or the time ended; need more than {ramp} "
                       "(raise --input-images or the part's cap)")
    ctx.sync()
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "timed_batches": timed, "ramp_batches": ramp, "first_s": first_s}


def part_profile(ctx: Context, deadline: float, model: str, precision: str, batch: int) -> dict:
    """torch.profiler over a few steps: top kernels by device time, time per kind, kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    size = ctx.settings["image_size"]
    cfg = adapt.make_config(model, precision, batch, size)
    strategy = adapt.build_strategy(cfg, adapt.build_model(cfg), ctx.device, steps_per_epoch=1000)
    strategy.train(True)
    images, labels = synthetic_batch(ctx, batch, size)
    for _ in range(ctx.settings["warmup"]):
        adapt.train_step(cfg, strategy, images, labels)
    ctx.sync()
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 0
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        while steps < ctx.settings["profile_steps"] and (steps == 0 or time.monotonic() < deadline):
            adapt.train_step(cfg, strategy, images, labels)
            steps += 1
        ctx.sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    return summarize_profile(prof.key_averages(), cuda, steps, wall_us) | {"model": model, "precision": precision,
                                                                           "batch": batch, "image_size": size}


KERNEL_KINDS = (  # first match wins; lower-case substrings of kernel names
    ("convolution", ("conv", "implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "cudnn", "winograd")),
    ("matmul", ("gemm", "cutlass", "cublas", "matmul", "addmm")),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("pooling / reduction", ("pool", "reduce", "mean")),
    ("optimizer", ("multi_tensor", "foreach", "sgd", "adam")),
    ("copy / layout", ("copy", "memcpy", "memset", "nchwtonhwc", "nhwctonchw", "transpose", "cat")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "relu", "sigmoid", "mul", "add")),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def summarize_profile(events, cuda: bool, steps: int, wall_us: float, top: int = 15) -> dict:
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    timed = [e for e in events if getattr(e, attr, 0) > 0 and (not cuda or _is_kernel(e))]
    total = sum(getattr(e, attr) for e in timed) or 1.0
    rows = sorted(timed, key=lambda e: getattr(e, attr), reverse=True)[:top]
    kinds: dict[str, float] = {}
    for e in timed:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + getattr(e, attr)
    return {"clock": "device (CUDA kernels)" if cuda else "CPU (ops)", "profiled_steps": steps,
            "wall_ms_per_step": wall_us / steps / 1000, "busy_ms_per_step": total / steps / 1000,
            "busy_fraction": total / wall_us, "events": "kernels" if cuda else "ops",
            "events_per_step": sum(e.count for e in timed) / steps,
            "by_kind": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": e.key[:100], "calls_per_step": e.count / steps, "ms_per_step": getattr(e, attr) / steps
                     / 1000, "share": getattr(e, attr) / total} for e in rows]}


def _is_kernel(event) -> bool:
    # Kernel rows have device time but no CPU time of their own; aten ops that launched them have both.
    return getattr(event, "self_cpu_time_total", 0) == 0


def part_strategy(ctx: Context, deadline: float, strategy_kind: str, model: str, precision: str, batch: int) -> dict:
    """Step time at world size 1: DDP (wrapped explicitly) against DeepSpeed ZeRO-1 and ZeRO-2."""
    zero = {"ddp": None, "zero1": 1, "zero2": 2}[strategy_kind]
    version = adapt.deepspeed_version() if zero is not None else None
    if zero is not None and version is None:
        raise SkipPart("deepspeed is not importable here; carry its wheel (docs/gpu.md, 'DeepSpeed')")
    backend = adapt.init_process_group(ctx.device)
    size = ctx.settings["image_size"]
    cfg = adapt.make_config(model, precision, batch, size, strategy="ddp" if zero is None else "deepspeed",
                            zero_stage=zero or 0)
    reset_memory(ctx)
    strategy = adapt.build_strategy(cfg, adapt.build_model(cfg), ctx.device, steps_per_epoch=1000)
    if zero is None:
        adapt.wrap_ddp_world1(strategy, ctx.device)
    strategy.train(True)
    images, labels = synthetic_batch(ctx, batch, size)
    timing = time_steps(ctx, lambda: adapt.train_step(cfg, strategy, images, labels), ctx.settings["warmup"],
                        ctx.settings["steps"], deadline)
    out = rate_result(ctx, model, precision, batch, size, timing)
    out.update(strategy=strategy_kind, zero_stage=zero, deepspeed=version, backend=backend, world_size=1,
               peak_memory_gib=peak_memory_gib(ctx), checkpoint=checkpoint_save(strategy))
    if zero is not None:
        out["note"] = "DeepSpeed bf16 casts the whole model to bf16 (no autocast); DDP runs bf16 autocast"
    return out


def run_part(ctx: Context, kind: str, params: dict, deadline: float) -> dict:
    parts = {"env": part_env, "train": part_train, "input": part_input, "profile": part_profile,
             "strategy": part_strategy, "resume": part_resume}
    if kind not in parts:
        raise ValueError(f"unknown part kind {kind!r}; known: {', '.join(parts)}")
    return parts[kind](ctx, deadline, **params)

