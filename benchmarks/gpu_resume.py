"""The device check's resume part: a run checkpointed halfway and resumed ends with an uninterrupted run's weights.

On the project's generated sample data (jobs.make_sample -> jobs.prepare shards), through the real loader,
the strategy's save/load pair and the checkpoint manifests: run A trains `steps` steps uninterrupted; run B
trains to `steps // 2`, saves, is thrown away, and a fresh process state (new model, strategy and loader)
loads the checkpoint and trains to `steps`; run C repeats A. Deterministic kernels are asked for
(`torch.use_deterministic_algorithms(True, warn_only=True)`, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG set
by the check before CUDA starts) and dropout is seeded per step as the loop's deterministic mode does, but a few
CUDA kernels have no deterministic version (e.g. adaptive average pooling's backward), so A and C may differ in
the last bits. The stated tolerance: max |w_B - w_A| <= max(1e-6, 4 x max |w_C - w_A|). A resume that loses the
optimizer, scheduler, data position or RNG differs by orders of magnitude more than that.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import gpu_adapters as adapt
from benchmarks.gpu_context import Context, SkipPart

ABS_FLOOR = 1e-6
NOISE_FACTOR = 4.0


def part_resume(ctx: Context, deadline: float, model: str, precision: str) -> dict:
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        return _resume(ctx, deadline, model, precision)
    finally:  # later parts in this process measure speed again
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1:]


def _resume(ctx: Context, deadline: float, model: str, precision: str) -> dict:
    s = ctx.settings
    sample = sample_shards(ctx)
    steps, batch, size = s["resume_steps"], s["resume_batch"], s["resume_image_size"]
    steps_per_epoch = sample["train_samples"] // batch
    if steps_per_epoch < 1:
        raise SkipPart(f"{sample['train_samples']} sample images are fewer than one batch of {batch}")
    cfg = adapt.make_config(model, precision, batch, size, epochs=math.ceil(steps / steps_per_epoch),
                            warmup_epochs=1.0, url=sample["url"])
    run = Runner(ctx, cfg, sample["classes"], steps_per_epoch, deadline)
    half = steps // 2
    t0 = time.perf_counter()
    a = run.train(0, steps)
    with tempfile.TemporaryDirectory(prefix="gpu-check-resume-") as d:
        b1 = run.train(0, half, save_to=Path(d))
        b2 = run.train(half, steps, load_from=Path(d))
    c = run.train(0, steps)
    diff_ab, diff_ac = max_abs_diff(a["state"], b2["state"]), max_abs_diff(a["state"], c["state"])
    tolerance = max(ABS_FLOOR, NOISE_FACTOR * diff_ac)
    return {"model": model, "precision": precision, "batch": batch, "image_size": size, "steps": steps,
            "checkpoint_at": half, "steps_per_epoch": steps_per_epoch, "sample": sample,
            "loader_workers": s["resume_loader_workers"], "max_abs_diff_resumed": diff_ab,
            "max_abs_diff_two_uninterrupted": diff_ac, "tolerance": tolerance,
            "tolerance_rule": f"max(|w_resumed - w_uninterrupted|) <= max({ABS_FLOOR:g}, {NOISE_FACTOR:g} x "
                              "max(|w_uninterrupted_2 - w_uninterrupted|)) over every float tensor of the model",
            "equal_within_tolerance": diff_ab <= tolerance, "final_loss": {"A": a["loss"], "B": b2["loss"],
                                                                         "C": c["loss"]},
            "checkpoint": b1["saved"], "restore_s": b2["restore_s"], "seconds": time.perf_counter() - t0}


def sample_shards(ctx: Context) -> dict:
    import json

    root = ctx.workdir / "sample"
    meta = root / "_made.json"
    if meta.exists():
        return json.loads(meta.read_text())
    root.mkdir(parents=True, exist_ok=True)
    try:
        made = adapt.make_sample_shards(root, ctx.settings["sample_classes"], ctx.settings["sample_per_class"])
    except ImportError as e:  # data/layout.py parses the sample's XML with defusedxml
        raise SkipPart(f"{e}: carry the wheels of benchmarks/gpu_wheels.sh (docs/gpu.md)") from e
    meta.write_text(json.dumps(made))
    return made


class Runner:
    """Trains steps [start, stop) from fresh objects, as a restarted worker would."""

    def __init__(self, ctx: Context, cfg, num_classes: int, steps_per_epoch: int, deadline: float):
        self.ctx, self.cfg, self.num_classes = ctx, cfg, num_classes
        self.steps_per_epoch, self.deadline = steps_per_epoch, deadline

    def train(self, start: int, stop: int, save_to: Path | None = None, load_from: Path | None = None) -> dict:
        ctx, cfg = self.ctx, self.cfg
        strategy = adapt.build_strategy(cfg, adapt.build_model(cfg, self.num_classes), ctx.device,
                                        self.steps_per_epoch)
        out: dict = {}
        if load_from is not None:
            t0 = time.perf_counter()
            saved = adapt.load_checkpoint(strategy, load_from)
            out["restore_s"] = time.perf_counter() - t0
            if saved["step"] != start:
                raise RuntimeError(f"checkpoint in {load_from} is at step {saved['step']}, expected {start}")
        strategy.train(True)
        step, loss = start, None
        while step < stop:
            epoch, first = divmod(step, self.steps_per_epoch)
            loader = adapt.train_loader(cfg.data.url, batch=cfg.data.global_batch_size, image_size=cfg.data.image_size,
                                        workers=ctx.settings["resume_loader_workers"], seed=cfg.run.seed,
                                        epoch=epoch, start_batch=first)
            for batch in loader:
                adapt.seed_step(cfg, step)
                images, labels = adapt.to_device(batch, ctx.device, cfg.model.channels_last)
                loss = adapt.train_step(cfg, strategy, images, labels)
                step += 1
                if step == stop:
                    break
            if time.monotonic() > self.deadline:
                raise SkipPart(f"the part's time ran out at step {step} of a {stop - start}-step run")
        if save_to is not None:
            out["saved"] = adapt.save_checkpoint(strategy, save_to, {"step": step, "epoch": step //
                                                                      self.steps_per_epoch})
            out["saved"]["mb"] = out["saved"].pop("bytes") / 2**20
        out.update(state=adapt.model_state(strategy), loss=loss.item() if loss is not None else None)
        return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"state_dict keys differ: {sorted(a.keys() ^ b.keys())[:5]}")
    return max((a[k] - b[k]).abs().max().item() for k in a)
