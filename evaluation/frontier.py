"""Accuracy against cost: the published single-model figures (models/published.py) at the forward GFLOPs of the
crop each was measured at, their Pareto frontier, the ILSVRC winners whose architecture the registry builds, and
this project's runs or checkpoint as highlighted points, drawn into one png (`frontier.png`)."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from evaluation.report import DISPLAY_NAMES, save_figure
from models import ILSVRC_WINNERS, list_models, summarize
from models.published import PUBLISHED


@dataclass(frozen=True)
class Point:
    label: str
    gflops: float  # forward, one image at `crop` px, 2 FLOPs per multiply-add (models/summary.py)
    top1: float  # %
    model: str
    crop: int


@functools.lru_cache(maxsize=None)
def model_gflops(name: str, crop: int, kwargs_json: str = "{}", num_classes: int = 1000) -> float:
    """Forward GFLOPs of one image (cached: the meta-device count costs up to a second for the large models)."""
    return summarize(name, image_size=crop, num_classes=num_classes, **json.loads(kwargs_json))["gflops"]


def published_points() -> list[Point]:
    """Every published single-model top-1 of a registered model, at the cost of its own crop."""
    return [Point(f"{DISPLAY_NAMES.get(name, name)}", model_gflops(name, p.crop), p.top1, name, p.crop)
            for name in list_models() for p in PUBLISHED.get(name, ()) if p.top1 is not None]


def frontier(points: list[Point]) -> list[Point]:
    """The Pareto frontier: by increasing cost, each point more accurate than every cheaper one."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.gflops, -p.top1)):
        if not out or p.top1 > out[-1].top1:
            out.append(p)
    return out


def winner_points(points: list[Point]) -> list[tuple[int, Point]]:
    """(year, the best published single-model point of the winning architecture), where the registry builds it."""
    best = {}
    for p in points:
        if p.model not in best or p.top1 > best[p.model].top1:
            best[p.model] = p
    return [(w.year, best[w.registered]) for w in ILSVRC_WINNERS if w.registered in best]


def our_point(label: str, model: str, top1: float, image_size: int, kwargs: dict | None = None,
              num_classes: int = 1000) -> Point:
    """A run or checkpoint of this project: top-1 as a fraction, cost at the size it was evaluated at."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "num_classes"}
    cost = model_gflops(model, image_size, json.dumps(kwargs, sort_keys=True), num_classes)
    return Point(label, cost, 100 * top1, model, image_size)


def frontier_chart(ours: list[Point], url: str) -> None:
    """Write the png to `url` (any fsspec URL): published points, frontier, winners, and `ours` highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = published_points()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    ax.scatter([p.gflops for p in points], [p.top1 for p in points], s=25, color="0.55", label="published single model")
    for p in {p.model: p for p in sorted(points, key=lambda p: p.top1)}.values():  # each model's best figure, named
        ax.annotate(f"{p.label}" + (f" @{p.crop}" if p.crop != 224 else ""), (p.gflops, p.top1), fontsize=7,
                    xytext=(4, -9), textcoords="offset points", color="0.3")
    edge = frontier(points)
    ax.step([p.gflops for p in edge], [p.top1 for p in edge], where="post", color="tab:green", lw=1.2,
            label="frontier of the published points")
    for year, p in winner_points(points):
        ax.scatter([p.gflops], [p.top1], marker="*", s=160, color="tab:orange", zorder=3)
        ax.annotate(f"ILSVRC {year}", (p.gflops, p.top1), fontsize=7, xytext=(-6, 6), textcoords="offset points",
                    color="tab:orange", ha="right")
    ax.scatter([], [], marker="*", s=160, color="tab:orange", label="ILSVRC winner's architecture (single model)")
    if ours:
        ax.scatter([p.gflops for p in ours], [p.top1 for p in ours], s=90, color="tab:red", edgecolor="black",
                   zorder=4, label="this project (val top-1 on its own data)")
        for p in ours:
            ax.annotate(f"{p.label} @{p.crop}px", (p.gflops, p.top1), fontsize=8, xytext=(5, 5),
                        textcoords="offset points", color="tab:red")
    ax.set_xscale("log")
    ax.set(xlabel="forward GFLOPs per image (2 per multiply-add), at the evaluation crop", ylabel="top-1 %",
           title="ImageNet-1k val top-1 (single model, single crop) against cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, url)


def run_points(runs) -> list[Point]:
    """One highlighted point per run with a figure: evaluated top-1 (jobs.evaluate) if any, else best val top-1."""
    from evaluation.report import run_row

    out = []
    for run in runs:
        row, cfg, ev = run_row(run), run.config or {}, run.evaluation or {}
        top1 = row["eval_top1"] if row["eval_top1"] is not None else row["top1"]
        if row["model"] not in list_models() or top1 is None:
            continue
        size = ev.get("image_size") or cfg.get("data", {}).get("image_size") or 224
        kwargs = ev.get("model_kwargs") or cfg.get("model", {}).get("kwargs") or {}
        classes = len(ev.get("centre", {}).get("per_class", ())) or 1000
        out.append(our_point(run.name, row["model"], top1, size, kwargs, classes))
    return out
