"""Parameter and FLOP counts of registered models, and the README table of published figures.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` for one image in eval mode (no aux heads),
on the meta device (shapes only: fast and hardware independent). It counts 2 FLOPs per multiply-add and
only matmul/convolution-type ops (BN, activations, pooling and the SE rescale are not counted), so
`gmacs` = gflops / 2 is what torchvision's "GFLOPS" column and most papers call FLOPs.
"""
from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .outputs import has_aux
from .published import ILSVRC_WINNERS, PUBLISHED, Published
from .registry import get_model, list_models

__all__ = ["count_flops", "count_params", "inference_params", "markdown_table", "summarize"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _eval_forward(model: nn.Module, image_size: int) -> set[int]:
    """Run one eval-mode forward of a 1-image batch; return the ids of the modules it called."""
    device = next(model.parameters()).device
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: called.add(id(m))) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return called


def inference_params(model: nn.Module, image_size: int = 224) -> int:
    """Parameters of the modules an eval-mode forward uses (drops GoogLeNet's aux heads)."""
    called = _eval_forward(model, image_size)
    return sum(p.numel() for m in model.modules() if id(m) in called for p in m.parameters(recurse=False))


def count_flops(model: nn.Module, image_size: int = 224) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward of a single image, by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        _eval_forward(model, image_size)
    return counter.get_total_flops()


def summarize(name: str, image_size: int = 224, num_classes: int = 1000, **model_kwargs) -> dict:
    """Parameter counts and forward FLOPs of registered model `name`, built on the meta device."""
    with torch.device("meta"):
        model = get_model(name, num_classes=num_classes, **model_kwargs)
    flops = count_flops(model, image_size)
    return {
        "name": name,
        "model_kwargs": model_kwargs,
        "params": count_params(model),
        "trainable_params": count_params(model, trainable_only=True),
        "params_inference": inference_params(model, image_size),
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "image_size": image_size,
        "num_classes": num_classes,
        "aux_heads": has_aux(model),
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, eval mode, batch 1, 2 FLOPs per multiply-add",
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}".rstrip("0").rstrip(".")


def _figure_cells(p: Published | None, s: dict, gflops_at: dict[int, float]) -> list[str]:
    """top-1, top-5, eval crop, GFLOPs at that crop, source: the cells of one published figure."""
    if p is None:
        return ["—", "—", "—", "—", "—, ours"]
    crop = gflops_at.setdefault(p.crop, s["gflops"] if p.crop == s["image_size"] else
                                summarize(s["name"], image_size=p.crop, **s["model_kwargs"])["gflops"])
    return [_pct(p.top1), _pct(p.top5), str(p.crop), f"{crop:.2f}", p.source + (f"; {p.note}" if p.note else "")]


def _model_rows(name: str, kwargs: dict, image_size: int) -> list[str]:
    s = summarize(name, image_size=image_size, **kwargs)
    label = name + "".join(f" ({k}={v})" for k, v in kwargs.items())
    figures = PUBLISHED.get(name) if not kwargs else None
    gflops_at: dict[int, float] = {}
    rows = []
    for i, p in enumerate(figures or [None]):
        head = [label, f"{s['params_inference']:,}", f"{s['gflops']:.2f}", f"{s['gmacs']:.2f}"] if i == 0 else [
            f"{label} (also)", "", "", ""]
        rows.append("| " + " | ".join(head + _figure_cells(p, s, gflops_at)) + " |")
    return rows


def markdown_table(image_size: int = 224) -> str:
    """Markdown: measured size/cost of every registered model beside its published accuracy and source."""
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}"
    lines = [
        f"Parameters at inference (no aux heads) and forward cost at {image_size}x{image_size}, one image, counted "
        f"by FlopCounterMode on the meta device ({versions}; `python -m models table`). GFLOPs count 2 per "
        "multiply-add; GMACs = GFLOPs / 2 (torchvision's \"GFLOPS\" column). Published: ImageNet-1k val, "
        "single model, single centre crop of the size in \"crop\", whose cost is the next column.",
        "",
        f"| model | params (inference) | GFLOPs ({image_size}) | GMACs ({image_size}) | top-1 % | top-5 % | crop | "
        "GFLOPs (crop) | source |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [(name, {}) for name in list_models()]
    rows.insert(rows.index(("se_googlenet", {})) + 1, ("se_googlenet", {"se_placement": "module"}))
    for name, kwargs in rows:
        lines += _model_rows(name, kwargs, image_size)
    for name in sorted(set(PUBLISHED) - set(list_models())):
        for p in PUBLISHED[name]:
            note = f"; {p.note}" if p.note else ""
            lines.append(f"| {name} (reference, not registered) | — | — | — | {_pct(p.top1)} | {_pct(p.top5)} | "
                         f"{p.crop} | — | {p.source}{note} |")
    lines += ["", "ILSVRC classification winners, top-5 error on the test set (ensembles, multi-crop):", "",
              "| year | team | model | top-5 error % | source |", "|---|---|---|---:|---|"]
    lines += [f"| {w.year} | {w.team} | {w.model} | {w.top5_error} | {w.source} |" for w in ILSVRC_WINNERS]
    return "\n".join(lines)
