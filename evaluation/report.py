"""Results pages: one checkpoint's evaluation beside the published figures (results.md/json), the cross-run
report beside the ILSVRC winners (report.md/png), and a run's training curves (curves.png)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

from distributed.checkpoint import CheckpointError, read_meta, select_checkpoint
from distributed.metrics import read_metrics
from distributed.run_folder import RunFolder, join
from models import ILSVRC_WINNERS
from models.published import published_for

# The single-model baselines every evaluation is printed beside (figures and sources: models/published.py).
REFERENCE_MODELS = ("alexnet", "googlenet", "resnet50", "se_resnet50", "senet154",
                    "resnet18", "resnet34", "regnety_016", "efficientnet_b1", "xception")  # the frontier at equal cost
DISPLAY_NAMES = {"alexnet": "AlexNet", "googlenet": "GoogLeNet", "resnet50": "ResNet-50",
                 "se_resnet50": "SE-ResNet-50", "senet154": "SENet-154", "se_googlenet": "SE-GoogLeNet",
                 "se_bn_inception": "SE-BN-Inception", "resnet18": "ResNet-18", "resnet34": "ResNet-34",
                 "regnety_016": "RegNetY-1.6GF", "efficientnet_b1": "EfficientNet-B1", "xception": "Xception"}
CURVES_CHART = "curves.png"  # the run folder's training curves (write_curves)
FRONTIER_CHART = "frontier.png"  # evaluation/frontier.py draws it beside results.md and report.md
PREDICT_KIND = "predict"  # the "kind" of predict's JSON sidecar, which jobs.report looks for
EVALUATE_KIND = "evaluate"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def published_rows(names=REFERENCE_MODELS) -> list[dict]:
    """Single-model, single-crop ILSVRC-2012 val figures (%) from models/published.py, one row per source."""
    return [{"model": DISPLAY_NAMES.get(n, n), "top1": p.top1, "top5": p.top5, "source": p.source, "note": p.note,
             "crop": p.crop} for n in names for p in published_for(n)]


def results_markdown(results: dict) -> str:
    """The evaluation page: this checkpoint beside the published figures, per-class accuracy, confused pairs."""
    name = DISPLAY_NAMES.get(results["model"], results["model"])
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"{name} ({results['weights']} weights, step {results['step']}, epoch {results['epoch']}) on "
             f"{results['data']} split `{results['split']}`: {results['centre']['samples']} images at "
             f"{results['image_size']} px, {len(results['corrupt'])} corrupt skipped.", "",
             "| model | protocol | top-1 % | top-5 % | source |", "|---|---|---:|---:|---|"]
    for proto, key in (("1 centre crop", "centre"), ("10-crop", "ten_crop")):
        if results.get(key):
            r = results[key]
            lines.append(f"| **{name} (this checkpoint)** | {proto} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} "
                         f"| this evaluation |")
    for row in published_rows(dict.fromkeys([*REFERENCE_MODELS, results["model"]])):
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['model']} | 1 centre crop, {row['crop']} px | {_pct(row['top1'])} | {_pct(row['top5'])} "
                     f"| {row['source']}{note} |")
    lines += ["", "Published figures are ImageNet-1k (1000 classes, 50,000 val images); compare only runs on the "
              "same data.", "", f"![top-1 against forward GFLOPs, beside the published models]({FRONTIER_CHART})", ""]
    best = results.get("ten_crop") or results["centre"]
    lines += [f"## Per-class accuracy ({'10-crop' if results.get('ten_crop') else 'centre crop'})", "",
              "| class | wnid | images | top-1 % | top-5 % |", "|---|---|---:|---:|---:|"]
    rows = sorted((c for c in best["per_class"] if c["samples"]), key=lambda c: c["top1"])
    shown = rows if len(rows) <= 20 else rows[:10] + rows[-10:]
    if len(rows) > 20:
        lines.insert(len(lines) - 2, "The ten worst and ten best classes; all are in results.json.\n")
    for c in shown:
        lines.append(f"| {c['name']} | {c['wnid']} | {c['samples']} | {100 * c['top1']:.1f} | {100 * c['top5']:.1f} |")
    lines += ["", "## Most confused pairs", "", "| true | predicted (top-1) | images | share of the true class |",
              "|---|---|---:|---:|"]
    for p in best["confused_pairs"]:
        lines.append(f"| {p['true_name']} ({p['true']}) | {p['predicted_name']} ({p['predicted']}) | {p['count']} | "
                     f"{100 * p['share']:.1f} % |")
    if not best["confused_pairs"]:
        lines.append("| — | — | 0 | — |")
    return "\n".join(lines) + "\n"


def default_results_dir(checkpoint_url: str) -> str:
    """Beside the checkpoint in its run folder when local, else the current directory."""
    fs, path = fsspec.core.url_to_fs(checkpoint_url)
    return os.path.dirname(path.rstrip("/")) if isinstance(fs, LocalFileSystem) else os.getcwd()


def write_results(results: dict, out_dir: str) -> tuple[str, str]:
    """results.json and results.md into `out_dir` (any fsspec URL); returns their URLs."""
    folder = RunFolder(out_dir)  # each file under a temporary name, then moved over the final one
    folder.write_text(RESULTS_JSON, json.dumps(results, indent=1))
    folder.write_text(RESULTS_MD, results_markdown(results))
    return folder.url(RESULTS_JSON), folder.url(RESULTS_MD)


def save_figure(fig, url: str) -> None:
    """A matplotlib figure as a PNG at `url` (any fsspec URL): drawn locally, then put under a temporary name and
    renamed (never half a PNG); the figure is closed."""
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, "figure.png")
        fig.savefig(local, dpi=100)
        base, name = url.rstrip("/").rsplit("/", 1) if "/" in url else (".", url)
        RunFolder(base).put_file(local, name)
    plt.close(fig)


@dataclass
class RunResults:
    """What one run folder holds for the report."""

    name: str
    url: str
    summary: dict | None
    config: dict | None  # config.yaml, for runs without summary.json (stopped or still running)
    metrics: list[dict]
    evaluation: dict | None  # results.json of jobs.evaluate
    localization: dict | None  # a predict sidecar with a localization error (val)
    checkpoint: dict | None = None  # the newest (or best evaluated) checkpoint: url and its meta.json


def run_checkpoint(url: str, best: bool) -> dict | None:
    """{"url", "role", "step", "score", ...} of the run's newest or best evaluated checkpoint; None without one."""
    try:
        chosen = select_checkpoint(url, best=best)
    except CheckpointError:
        return None
    return {"url": chosen, **(read_meta(chosen) or {})}


def read_run(url: str, best: bool = False) -> RunResults:
    run = RunFolder(url)
    if not run.fs.exists(run.path):
        raise FileNotFoundError(f"run folder {url} does not exist")
    text = run.read_text("summary.json")
    evaluation = run.read_text(RESULTS_JSON)
    localization = None
    for path in sorted(run.fs.glob(join(run.path, "*.json"))):
        with run.fs.open(path, "r") as f:
            doc = json.load(f)
        if isinstance(doc, dict) and doc.get("kind") == PREDICT_KIND and doc.get("localization"):
            localization = doc
    config = yaml.safe_load(run.read_text("config.yaml") or "null")
    return RunResults(run.uri.rsplit("/", 1)[-1], run.uri, json.loads(text) if text else None, config,
                      read_metrics(run), json.loads(evaluation) if evaluation else None, localization,
                      run_checkpoint(url, best))


def run_row(run: RunResults) -> dict:
    """One run's figures (fractions): best val top-1/top-5 from summary.json, else from metrics.jsonl."""
    evals = [r for r in run.metrics if r.get("kind") == "eval"]
    best = max(evals, key=lambda r: r["val_top1"], default=None)
    s, cfg = run.summary or {}, run.config or {}
    row = {"run": run.name,
           "model": s.get("model") or cfg.get("model", {}).get("name") or (run.evaluation or {}).get("model"),
           "strategy": s.get("strategy") or cfg.get("strategy", {}).get("name"),
           "workers": s.get("world_size") or cfg.get("run", {}).get("num_workers"),
           "epochs": s.get("epochs", best["epoch"] if best else None),
           "top1": s.get("best_top1", best["val_top1"] if best else None),
           "top5": s.get("best_top5", best["val_top5"] if best else None),
           "eval_top1": None, "eval_top5": None, "eval_protocol": None, "loc5": None,
           "checkpoint": run.checkpoint["url"].rsplit("/", 1)[-1] if run.checkpoint else None,
           "checkpoint_score": (run.checkpoint or {}).get("score")}
    if run.evaluation:
        r = run.evaluation.get("ten_crop") or run.evaluation["centre"]
        row.update(eval_top1=r["top1"], eval_top5=r["top5"],
                   eval_protocol="10-crop" if run.evaluation.get("ten_crop") else "centre crop")
    if run.localization:
        row["loc5"] = run.localization["localization"]["top5_localization_error"]
    return row


def report_markdown(runs: list[RunResults], chart: str) -> str:
    rows = [run_row(r) for r in runs]
    f = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
    lines = ["# Runs beside the ILSVRC results", "", f"![top-5 error and training curves]({chart})", "",
             f"![top-1 against forward GFLOPs: the runs beside the published models and their frontier]"
             f"({FRONTIER_CHART})", "",
             "## Runs", "", "| run | model | strategy | workers | epochs | best val top-1 % | best val top-5 % | "
             "evaluated top-1 % | evaluated top-5 % | protocol | top-5 loc. error % | checkpoint (score %) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        score = f" ({f(r['checkpoint_score'])})" if r["checkpoint_score"] is not None else ""
        lines.append(f"| {r['run']} | {r['model'] or '—'} | {r['strategy'] or '—'} | {r['workers'] or '—'} "
                     f"| {r['epochs'] or '—'} | {f(r['top1'])} | {f(r['top5'])} | {f(r['eval_top1'])} "
                     f"| {f(r['eval_top5'])} | {r['eval_protocol'] or '—'} | {f(r['loc5'])} "
                     f"| {r['checkpoint'] or '—'}{score} |")
    lines += ["", "Best val figures come from the training run's evaluations (summary.json / metrics.jsonl); "
              "evaluated ones from `jobs.evaluate` (results.json); localization error from `jobs.predict --split val`.",
              "", "## ILSVRC classification winners (top-5 error on the test set)", "",
              "Ensembles and multi-crop on the ILSVRC test set: not comparable with a single model on val.", "",
              "| year | team | model | top-5 error % | source |", "|---:|---|---|---:|---|"]
    for w in ILSVRC_WINNERS:
        lines.append(f"| {w.year} | {w.team} | {w.model} | {w.top5_error:.2f} | {w.source} |")
    lines += ["", "## Published single models (ILSVRC-2012 val, 1 centre crop)", "",
              "| model | top-1 % | top-5 % | crop px | source |", "|---|---:|---:|---:|---|"]
    for p in published_rows():
        lines.append(f"| {p['model']} | {_pct(p['top1'])} | {_pct(p['top5'])} | {p['crop']} | {p['source']} |")
    return "\n".join(lines) + "\n"


def report_chart(runs: list[RunResults], path: str) -> None:
    """PNG: top-5 error of the winners by year and of the runs; training loss; val top-1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = [f"{w.year}\n{w.model.split(' ')[0]}" for w in ILSVRC_WINNERS]
    values = [w.top5_error for w in ILSVRC_WINNERS]
    colours = ["0.6"] * len(values)
    for row in map(run_row, runs):
        top5 = row["eval_top5"] if row["eval_top5"] is not None else row["top5"]
        if top5 is not None:
            labels.append(row["run"])
            values.append(100 * (1 - top5))
            colours.append("tab:blue")
    ax1.bar(range(len(values)), values, color=colours)
    ax1.set_xticks(range(len(values)), labels, fontsize=7)
    ax1.set(ylabel="top-5 error %", title="ILSVRC winners (grey, test) and runs (blue, val)")
    for run in runs:
        trains = [r for r in run.metrics if r.get("kind") == "train"]
        evals = [r for r in run.metrics if r.get("kind") == "eval"]
        ax2.plot([r["step"] for r in trains], [r["loss"] for r in trains], label=run.name)
        ax3.plot([r["epoch"] for r in evals], [r["val_top1"] for r in evals], marker="o", label=run.name)
    ax2.set(xlabel="step", ylabel="training loss", title="training loss")
    ax3.set(xlabel="epoch", ylabel="val top-1", ylim=(0, 1), title="validation top-1")
    for ax in (ax2, ax3):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_curves(run_url: str) -> None:
    """The run folder's curves.png: training loss per step, and val top-1/top-5 per epoch (from metrics.jsonl)."""
    run = RunFolder(run_url)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in trains], [r["loss"] for r in trains])
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    for key, label in (("val_top1", "top-1"), ("val_top5", "top-5")):
        ax2.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=label)
    ax2.set(xlabel="epoch", ylabel="val accuracy", ylim=(0, 1), title="validation")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, run.url(CURVES_CHART))
