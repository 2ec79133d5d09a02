"""The device check's harness, shared by its parts (benchmarks/gpu_parts.py, benchmarks/gpu_resume.py): the
Context a part runs in, SkipPart, timing of steps between device synchronisations, rates with MFU, memory, log."""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.gpu_specs import mfu, parse_peak_override, resolve_peak, train_flops_per_image


class SkipPart(Exception):
    """The part cannot run here (no CUDA, no DeepSpeed, no time left); the message says why."""


@dataclass
class Context:
    settings: dict
    workdir: Path
    report: dict  # the JSON so far: later parts compare against earlier results
    device: torch.device = field(init=False)
    _flops: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = torch.device(self.settings["device"])
        self.peak_override = parse_peak_override(self.settings.get("peak_tflops"))
        if self.settings.get("threads"):
            torch.set_num_threads(self.settings["threads"])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def smoke(self) -> bool:
        return bool(self.settings["smoke"])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def flops(self, model: str, image_size: int) -> dict:
        if (model, image_size) not in self._flops:
            self._flops[(model, image_size)] = train_flops_per_image(model, image_size)
        return self._flops[(model, image_size)]

    def peak(self, precision: str) -> dict:
        return resolve_peak(self.device_name(), precision, torch.backends.cudnn.allow_tf32, self.peak_override)

    def result_of(self, name: str) -> dict | None:
        part = self.report["parts"].get(name)
        return part.get("result") if part and part.get("status") == "ok" else None


def need_cuda(ctx: Context, what: str) -> None:
    if ctx.device.type != "cuda":
        raise SkipPart(f"CUDA-only: {what}")


def time_steps(ctx: Context, step, warmup: int, steps: int, deadline: float) -> dict:
    """Run `warmup` untimed steps, then up to `steps` timed ones before `deadline`; seconds between syncs."""
    t_first = time.perf_counter()
    for i in range(warmup):
        step()
        if i == 0:
            ctx.sync()
            first_s = time.perf_counter() - t_first
        if time.monotonic() > deadline:
            break
    ctx.sync()
    t0, n = time.perf_counter(), 0
    while n < steps and (n == 0 or time.monotonic() < deadline):  # at least one timed step
        step()
        n += 1
    ctx.sync()
    return {"steps": n, "seconds": time.perf_counter() - t0, "first_step_s": first_s if warmup else None}


def rate_result(ctx: Context, model: str, precision: str, batch: int, image_size: int, timing: dict) -> dict:
    images_per_s = batch * timing["steps"] / timing["seconds"]
    flops = ctx.flops(model, image_size)
    peak = ctx.peak(precision)
    return {"model": model, "precision": precision, "batch": batch, "image_size": image_size,
            "images_per_s": images_per_s, "step_ms": 1000 * timing["seconds"] / timing["steps"],
            "timed_steps": timing["steps"], "first_step_s": timing["first_step_s"],
            "train_flops_per_image": flops["train_step"],
            "mfu": mfu(images_per_s, flops["train_step"], peak["tflops"]), "peak": peak}


def reset_memory(ctx: Context) -> None:
    gc.collect()  # earlier parts' models and engines (DeepSpeed keeps reference cycles)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_memory_gib(ctx: Context) -> float | None:
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None


def synthetic_batch(ctx: Context, batch: int, image_size: int):
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(ctx.device)
    return images, torch.randint(0, 1000, (batch,), generator=gen).to(ctx.device)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
