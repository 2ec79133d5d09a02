"""Render a device check's JSON (benchmarks.gpu_check) as the markdown section for BENCHMARKS.md; judge the goals.

    python -m benchmarks.render_gpu OUT/gpu_check.json [--out section.md]

Pure Python (no torch): the check's supervisor uses it too. Every table names the card, versions, command and
date it came from; a cell of a part that did not run says why.
"""
from __future__ import annotations

import argparse
import json
import sys

NVIDIA_RN50_A100_AMP = 2470.0  # img/s, 1x A100 80GB, AMP, DALI; NVIDIA DeepLearningExamples RN50 v1.5 (PyTorch)
NVIDIA_RN50_SOURCE = ("NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
                      "'Training performance: NVIDIA DGX A100 (8x A100 80GB)', 1 GPU, mixed precision")
A100_BF16_PEAK = 312.0


def _part(report: dict, name: str) -> dict:
    return report["parts"].get(name, {"status": "not planned"})


def _ok(report: dict, name: str) -> dict | None:
    p = _part(report, name)
    return p.get("result") if p["status"] == "ok" else None


def _why(report: dict, name: str) -> str:
    p = _part(report, name)
    return f"{name}: {p['status']}" + (f" ({p['reason']})" if p.get("reason") else "")


def _train_parts(report: dict, model: str) -> list[tuple[str, dict]]:
    """Finished training parts of `model` at the default batch (names train/MODEL/PRECISION/LAYOUT/MODE)."""
    return [(n, p["result"]) for n, p in report["parts"].items()
            if n.startswith(f"train/{model}/") and n.count("/") == 4 and p["status"] == "ok"]


def evaluate_goals(report: dict) -> list[dict]:
    """The issue's four goals, each with target, measured value and whether it was met (None: not measured)."""
    main = "se_googlenet"
    goals = []
    no_peak = "no datasheet peak for this device in benchmarks/gpu_specs.py (pass --peak-tflops)"
    best = max(((r["mfu"], n) for n, r in _train_parts(report, main) if r.get("mfu") is not None), default=None)
    why = no_peak if _ok(report, f"train/{main}/bf16/cl/eager") else _why(report, f"train/{main}/bf16/cl/eager")
    goals.append(_goal("se_googlenet MFU with synthetic input (best of bf16/fp16, eager/compile)", 0.25,
                       best[0] if best else None, best[1] if best else why, higher=True))
    synthetic = _ok(report, f"train/{main}/bf16/cl/eager")
    gpu_input = _ok(report, "input/gpu")
    ratio = gpu_input["images_per_s"] / synthetic["images_per_s"] if synthetic and gpu_input else None
    goals.append(_goal("real input path (GPU decode) / synthetic images/s, se_googlenet bf16", 0.90, ratio,
                       "input/gpu vs train/se_googlenet/bf16/cl/eager" if ratio else
                       "; ".join(_why(report, n) for n in ("input/gpu", f"train/{main}/bf16/cl/eager")), higher=True))
    se, plain = synthetic, _ok(report, "train/googlenet/bf16/cl/eager")
    overhead = se["step_ms"] / plain["step_ms"] if se and plain else None
    goals.append(_goal("SE overhead: se_googlenet / googlenet step time (bf16, channels_last, eager)", 1.10,
                       overhead, "train/*/bf16/cl/eager" if overhead else _why(report, "train/googlenet/bf16/cl/eager"),
                       higher=False))
    env = _ok(report, "env")
    peak = (env or {}).get("peaks", {}).get("bf16", {}).get("tflops")
    target = NVIDIA_RN50_A100_AMP * peak / A100_BF16_PEAK if peak else None
    rn = max(((r["images_per_s"], n) for n, r in _train_parts(report, "resnet50")
              if r["precision"] in ("bf16", "fp16")), default=None)
    detail = rn[1] if rn else _why(report, "train/resnet50/bf16/cl/eager")
    goals.append(_goal(f"resnet50 images/s >= {NVIDIA_RN50_A100_AMP:,.0f} x bf16 peak / {A100_BF16_PEAK:.0f} "
                       f"({NVIDIA_RN50_SOURCE})", target, rn[0] if rn else None,
                       detail if target else f"{detail}; {no_peak}", higher=True))
    return goals


def _goal(goal: str, target: float | None, measured: float | None, detail: str, higher: bool) -> dict:
    met = None
    if measured is not None and target is not None:
        met = measured >= target if higher else measured <= target
    return {"goal": goal, "target": target, "measured": measured, "met": met, "detail": detail,
            "direction": ">=" if higher else "<="}


# -- markdown ------------------------------------------------------------------------------------------------

def _f(x, fmt: str = "{:,.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _header(report: dict) -> list[str]:
    env = _ok(report, "env") or {}
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "torchvision", "cuda", "cudnn", "timm",
                                                       "deepspeed"))
    matmul = env.get("matmul_tflops", {})
    memory = f", {env['memory_gib']:.0f} GiB" if env.get("memory_gib") else ""
    return [f"## GPU check: {env.get('device', 'device unknown')} ({report.get('started', '?')[:10]})", "",
            f"Card: {env.get('device')}{memory}, {env.get('cpu_count')} CPUs; {versions}; commit {env.get('commit')}.",
            f"Command: `{report['command']}` ({report['mode']} mode, budget {report['settings']['budget_s']:.0f} s). "
            f"Parts: {report.get('summary', {})}.",
            f"Measured {matmul.get('dtype')} matmul ({matmul.get('n')}^3): {_f(matmul.get('tflops'), '{:.3g}')} TFLOP/s; "
            f"MFU below is against the datasheet peak named in each row.", ""]


def _train_table(report: dict) -> list[str]:
    lines = ["| part | images/s | step ms | MFU % (peak) | peak mem GiB | compile s | checkpoint save s (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in report["parts"].items():
        if p["kind"] != "train":
            continue
        r = p.get("result")
        if not r:
            lines.append(f"| {name} | {p['status']}: {p.get('reason', '')} | | | | | |")
            continue
        peak = r["peak"]
        mfu = f"{100 * r['mfu']:.1f} ({peak['kind']} {peak['tflops']:g})" if r.get("mfu") is not None else "—"
        ck = r.get("checkpoint")
        saved = f"{ck['save_s']:.2f} ({ck['mb']:.0f})" if ck else "—"
        lines.append(f"| {name} | {_f(r['images_per_s'])} | {_f(r['step_ms'], '{:.1f}')} | {mfu} | "
                     f"{_f(r.get('peak_memory_gib'), '{:.1f}')} | {_f(r.get('compile_s'), '{:.0f}')} | {saved} |")
    return lines


def _parts_table(report: dict, header: str, rule: str, names: tuple[str, ...], row) -> list[str]:
    """A markdown table of the named parts: `row(name, result)` for each that ran, else why it did not."""
    lines = [header, rule]
    for name in names:
        r = _ok(report, name)
        lines.append(row(name, r) if r is not None else f"| {_why(report, name)} |" + " |" * (rule.count("|") - 2))
    return lines


def _input_table(report: dict) -> list[str]:
    return _parts_table(
        report, "| part | decode | loader workers | loader alone img/s | training img/s | vs synthetic |",
        "|---|---|---:|---:|---:|---:|", ("input/cpu", "input/gpu"),
        lambda name, r: f"| {name} | {r['decode']} | {r['loader_workers']} | "
                        f"{_f(r['loader_only']['images_per_s'])} | {_f(r['images_per_s'])} | "
                        f"{_f(r.get('vs_synthetic'), '{:.2f}')} |")


def _strategy_table(report: dict) -> list[str]:
    return _parts_table(
        report, "| strategy (world 1, se_googlenet bf16) | images/s | step ms | peak mem GiB | checkpoint save s |",
        "|---|---:|---:|---:|---:|", ("strategy/ddp", "strategy/zero1", "strategy/zero2"),
        lambda name, r: f"| {name} | {_f(r['images_per_s'])} | {_f(r['step_ms'], '{:.1f}')} | "
                        f"{_f(r.get('peak_memory_gib'), '{:.1f}')} | {_f(r['checkpoint']['save_s'], '{:.2f}')} |")


def _resume_lines(report: dict) -> list[str]:
    r = _ok(report, "resume")
    if r is None:
        return [f"Resume: {_why(report, 'resume')}."]
    verdict = "equal within tolerance" if r["equal_within_tolerance"] else "NOT equal within tolerance"
    return [f"Resume ({r['model']} {r['precision']}, {r['steps']} steps of batch {r['batch']} at {r['image_size']} px "
            f"on the sample data, checkpoint at step {r['checkpoint_at']}): max |w_resumed - w_uninterrupted| = "
            f"{r['max_abs_diff_resumed']:.3g}; two uninterrupted runs differ by {r['max_abs_diff_two_uninterrupted']:.3g}; "
            f"tolerance {r['tolerance']:.3g} ({r['tolerance_rule']}): **{verdict}**. Checkpoint save "
            f"{r['checkpoint']['seconds']:.2f} s ({r['checkpoint']['mb']:.0f} MB), restore {r['restore_s']:.2f} s."]


def _profile_lines(report: dict) -> list[str]:
    lines = []
    for name, p in report["parts"].items():
        if p["kind"] != "profile":
            continue
        r = p.get("result")
        if not r:
            lines.append(f"Profile {_why(report, name)}.")
            continue
        kinds = ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["by_kind"].items())
        lines += [f"**{name}** ({r['clock']}): {r['wall_ms_per_step']:.1f} ms per step wall, "
                  f"{r['busy_ms_per_step']:.1f} ms busy ({100 * r['busy_fraction']:.0f} %), "
                  f"{r['events_per_step']:.0f} {r['events']} per step; by kind: {kinds}.", "",
                  f"| {r['events'][:-1]} | calls/step | ms/step | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['name'][:80]}` | {t['calls_per_step']:.0f} | {t['ms_per_step']:.2f} | {100 * t['share']:.1f} % |"
                  for t in r["top"][:10]]
        lines.append("")
    return lines


def _goal_table(goals: list[dict]) -> list[str]:
    lines = ["| goal | target | measured | met |", "|---|---:|---:|---|"]
    for g in goals:
        met = {True: "yes", False: "**no**", None: f"not measured: {g['detail']}"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['direction']} {_f(g['target'], '{:,.2f}')} | "
                     f"{_f(g['measured'], '{:,.3f}')} | {met} |")
    return lines


def render(report: dict) -> str:
    goals = report.get("goals") or evaluate_goals(report)
    s = report["settings"]
    out = _header(report)
    out += [f"### Training throughput, synthetic tensors on the device ({s['image_size']} px, batch {s['batch']})", ""]
    out += _train_table(report) + ["", "### Real input path (shards made on the spot)", ""] + _input_table(report)
    out += ["", "### DDP against DeepSpeed ZeRO", ""] + _strategy_table(report) + ["", "### Resume", ""]
    out += _resume_lines(report) + ["", "### Profiles (torch.profiler)", ""] + _profile_lines(report)
    out += ["### Goals", ""] + _goal_table(goals) + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.render_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="gpu_check.json written by python -m benchmarks.gpu_check")
    p.add_argument("--out", help="write the markdown here instead of stdout")
    args = p.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    text = render(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
