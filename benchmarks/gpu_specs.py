"""GPU datasheet peaks and the model FLOPs of one training image: the two halves of MFU.

MFU (model FLOP utilisation; Chowdhery et al., PaLM, arXiv:2204.02311, App. B) = model FLOPs per second
achieved / the card's peak for the precision used. Model FLOPs of a training image = 3 x its forward FLOPs
(backward ~ 2 x forward: one matmul for the input gradient, one for the weight gradient), the forward counted
by `torch.utils.flop_counter.FlopCounterMode` on the real model in training mode (aux heads included), on the
meta device (shapes only). FlopCounterMode counts 2 FLOPs per multiply-add of matmul/convolution ops only.

Peaks are dense (no 2:4 sparsity) tensor-core rates from each card's datasheet. fp32 training on Ampere and
later runs its convolutions on TF32 tensor cores (cuDNN's default, `torch.backends.cudnn.allow_tf32`), so its
MFU is taken against the TF32 peak when that flag is on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CardPeak:
    name: str  # a readable name; `pattern` matches torch.cuda.get_device_name()
    pattern: str
    tflops: dict  # dense TFLOP/s by kind: bf16, fp16, tf32 (tensor cores), fp32 (CUDA cores)
    source: str


# Most specific first: the first pattern that matches the device name wins.
CARDS: tuple[CardPeak, ...] = (
    CardPeak("H200 NVL", r"H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
             "NVIDIA H200 datasheet, H200 NVL column (sparse figures halved): https://www.nvidia.com/en-us/data-center/h200/"),
    CardPeak("H200 SXM", r"H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
             "NVIDIA H200 datasheet, H200 SXM column (BF16 1,979 / TF32 989 TFLOPS with sparsity, halved): "
             "https://www.nvidia.com/en-us/data-center/h200/"),
    CardPeak("H100 PCIe", r"H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
             "NVIDIA H100 datasheet, H100 PCIe column (sparse figures halved): https://www.nvidia.com/en-us/data-center/h100/"),
    CardPeak("H100 SXM", r"H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
             "NVIDIA H100 datasheet, H100 SXM column (sparse figures halved): https://www.nvidia.com/en-us/data-center/h100/"),
    CardPeak("A100", r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
             "NVIDIA A100 datasheet (40 GB and 80 GB, SXM and PCIe): https://www.nvidia.com/content/dam/en-zz/"
             "Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    CardPeak("A10G", r"A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.5},
             "No NVIDIA or AWS datasheet gives the A10G's tensor rates; third-party figures from Baseten, "
             "'NVIDIA A10 vs A10G for ML model inference': https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/"),
    CardPeak("A10", r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
             "NVIDIA A10 datasheet: https://www.nvidia.com/en-us/data-center/products/a10-gpu/"),
    CardPeak("L4", r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
             "NVIDIA L4 datasheet (sparse figures halved): https://www.nvidia.com/en-us/data-center/l4/"),
)

PRECISIONS = ("fp32", "bf16", "fp16")


def find_card(device_name: str) -> CardPeak | None:
    """The table entry whose pattern matches `device_name` (e.g. 'NVIDIA H200'), or None."""
    for card in CARDS:
        if re.search(card.pattern, device_name):
            return card
    return None


def card_by_name(name: str) -> CardPeak:
    for card in CARDS:
        if card.name == name:
            return card
    raise KeyError(f"no card named {name!r}; known: {', '.join(c.name for c in CARDS)}")


def peak_kind(precision: str, tf32: bool) -> str:
    """Which peak a training precision runs at: bf16/fp16 tensor cores; fp32 on TF32 tensor cores if allowed."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    return precision


def parse_peak_override(text: str | None) -> dict:
    """'--peak-tflops 989' (every kind) or 'bf16=989,fp16=989,tf32=494,fp32=67' -> {kind: TFLOP/s}."""
    if not text:
        return {}
    kinds = ("bf16", "fp16", "tf32", "fp32")
    try:
        if "=" not in text:
            return dict.fromkeys(kinds, float(text))
        out = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in kinds:
                raise ValueError(f"unknown kind {key.strip()!r}")
            out[key.strip()] = float(value)
        return out
    except ValueError as e:
        raise ValueError(f"--peak-tflops {text!r}: {e}; give one number, or kind=TFLOPS pairs with kinds "
                         f"{', '.join(kinds)}, e.g. bf16=989,tf32=494") from None


def resolve_peak(device_name: str, precision: str, tf32: bool, override: dict | None = None) -> dict:
    """{"tflops", "kind", "source"} for MFU; tflops None when neither the table nor the override knows it."""
    kind = peak_kind(precision, tf32)
    if override and kind in override:
        return {"tflops": override[kind], "kind": kind, "source": "--peak-tflops (command line)"}
    card = find_card(device_name)
    if card is None:
        return {"tflops": None, "kind": kind,
                "source": f"no datasheet peak for {device_name!r} in benchmarks/gpu_specs.py; pass --peak-tflops"}
    return {"tflops": card.tflops[kind], "kind": kind, "source": card.source}


def mfu(images_per_s: float, flops_per_image: float, peak_tflops: float | None) -> float | None:
    """Fraction of the peak: images/s x training FLOPs per image / (peak TFLOP/s x 1e12)."""
    if not peak_tflops:
        return None
    return images_per_s * flops_per_image / (peak_tflops * 1e12)


def train_flops_per_image(model_name: str, image_size: int, num_classes: int = 1000, **model_kwargs) -> dict:
    """Forward FLOPs per image in training mode (aux heads on) and eval mode, and 3 x training forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import get_model

    with torch.device("meta"):
        model = get_model(model_name, num_classes=num_classes, **model_kwargs)
    counts = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        counter = FlopCounterMode(display=False)
        # Batch 2: BatchNorm in training mode needs more than one value per channel on 1x1 maps.
        with counter, torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size, device="meta"))
        counts[mode] = counter.get_total_flops() / 2
    return {"forward_train": counts["train"], "forward_eval": counts["eval"], "train_step": 3 * counts["train"],
            "params": sum(p.numel() for p in model.parameters()),
            "convention": "FlopCounterMode (2 FLOPs per multiply-add, matmul/conv only), training-mode forward "
                          "with aux heads, x3 for forward+backward"}
