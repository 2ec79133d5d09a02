"""The GPU device check: one command, a time budget, every figure into one folder (JSON, log, markdown).

    python -m benchmarks.gpu_check OUTDIR [--budget-s 420] [--only REGEX] [--skip REGEX]
    python -m benchmarks.gpu_check OUTDIR --smoke        # every part at toy size on the CPU, well under a minute

Parts, in priority order (see docs/gpu.md): env (versions, peak table, a matmul), synthetic training images/s
and MFU of each model in bf16 + channels_last, the real input path (CPU decode with N loader workers, GPU
decode), a 200-step run checkpointed at 100 and resumed, torch.profiler top kernels, a small-batch point for the
scaling model, torch.compile of se_googlenet, DDP against DeepSpeed ZeRO-1/2, fp32 / fp16 / channels-first
variants, torch.compile of the other models.

Time-boxing: this process is a supervisor that never imports torch. It runs the parts in a child process and
polls `gpu_check.json`, which the child rewrites atomically after every part. A part that outlives its cap
(or the global budget) is killed with its child's process group and recorded as "timeout"; a new child
carries on with the next part. Every part ends "ok", "skipped" (with the reason), "failed" (with the error)
or "timeout", so a killed run still leaves everything measured so far.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCHEMA = "gpu_check/1"
JSON_NAME, LOG_NAME, MD_NAME = "gpu_check.json", "gpu_check.log", "gpu_check.md"
MODELS = ("se_googlenet", "googlenet", "resnet50")
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS determinism; must be set before CUDA starts
FULL = dict(device="cuda", image_size=224, batch=256, small_batch=32, warmup=5, steps=30, loader_workers=None,
            input_images=12288, input_unique=256, input_per_shard=1024, resume_steps=200, resume_batch=32,
            resume_image_size=64, resume_loader_workers=4, sample_classes=5, sample_per_class=200,
            profile_steps=5, budget_s=420.0, cap_scale=1.0, min_part_s=5.0, threads=None, variants_of="all")
SMOKE = dict(device="cpu", image_size=32, batch=2, small_batch=2, warmup=1, steps=2, loader_workers=2,
             input_images=12, input_unique=4, input_per_shard=4, resume_steps=4, resume_batch=2,
             resume_image_size=32, resume_loader_workers=0, sample_classes=2, sample_per_class=8,
             profile_steps=1, budget_s=600.0, cap_scale=4.0, min_part_s=1.0,
             threads=1,  # on a shared CPU, OpenMP threads spinning at barriers cost 10x more than they give
             variants_of="main")  # fp32/fp16/channels-first/profile parts for the main model only


def plan(s: dict) -> list[dict]:
    """The parts in priority order: name, kind, params, cap (seconds), extra environment."""
    main = "se_googlenet" if "se_googlenet" in s["models"] else s["models"][0]
    p: list[dict] = [_part("env", "env", {}, 60)]

    def train(model, precision="bf16", cl=True, compile=False, batch=None, cap=45, checkpoint=False):
        batch = batch or s["batch"]
        name = f"train/{model}/{precision}/{'cl' if cl else 'nocl'}/{'compile' if compile else 'eager'}"
        name += f"/b{batch}" if batch != s["batch"] else ""
        params = dict(model=model, precision=precision, channels_last=cl, compile=compile, batch=batch)
        return _part(name, "train", params | ({"checkpoint": True} if checkpoint else {}), cap)

    p += [train(m, checkpoint=True) for m in s["models"]]
    common = dict(model=main, precision="bf16", batch=s["batch"])
    variants = s["models"] if s["variants_of"] == "all" else [main]
    p += [_part("input/cpu", "input", dict(decode="cpu", **common), 90),
          _part("input/gpu", "input", dict(decode="gpu", **common), 60),
          _part("resume", "resume", dict(model=main, precision="bf16"), 150,
                DETERMINISTIC_ENV if s["device"] == "cuda" else None)]
    p += [_part(f"profile/{m}", "profile", dict(model=m, precision="bf16", batch=s["batch"]), 40)
          for m in variants if m != "resnet50"]
    if s["small_batch"] != s["batch"]:  # the scaling model's per-GPU batch of the configs
        p.append(train(main, batch=s["small_batch"], cap=30))
    p.append(train(main, compile=True, cap=180))
    p += [_part(f"strategy/{k}", "strategy", dict(strategy_kind=k, **common), 60) for k in ("ddp", "zero1", "zero2")]
    for m in [main] + [v for v in variants if v != main]:
        p += [train(m, precision, cl, cap=30) for precision, cl in (("fp32", True), ("fp16", True), ("bf16", False))]
    p += [train(m, compile=True, cap=180) for m in s["models"] if m != main]
    for part in p:
        part["cap_s"] *= s["cap_scale"]
    names = [x["name"] for x in p]
    assert len(names) == len(set(names)), names  # the report is keyed by part name
    return [x for x in p if x["kind"] == "env" or (re.search(s["only"] or "", x["name"])
                                                   and not (s["skip"] and re.search(s["skip"], x["name"])))]


def _part(name: str, kind: str, params: dict, cap_s: float, env: dict | None = None) -> dict:
    return {"name": name, "kind": kind, "params": params, "cap_s": cap_s, "env": env or {}, "status": "pending"}


# -- the JSON file: written atomically, by the child while it runs and by the supervisor otherwise -------------

def write_report(out: Path, report: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{JSON_NAME}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, out / JSON_NAME)


def read_report(out: Path) -> dict:
    return json.loads((out / JSON_NAME).read_text())


def finish_part(part: dict, status: str, reason: str | None = None, **extra) -> None:
    part.update(status=status, **extra)
    if reason:
        part["reason"] = reason


# -- supervisor ------------------------------------------------------------------------------------------------

def supervise(out: Path, report: dict) -> dict:
    budget_end = time.time() + report["settings"]["budget_s"]
    log = open(out / LOG_NAME, "a", buffering=1)
    shown: set = set()
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as work:
        while True:
            report = read_report(out)
            shown |= print_finished(report["parts"], shown)
            pending = [p for p in report["parts"].values() if p["status"] == "pending"]
            if not pending:
                break
            if time.time() >= budget_end:
                for p in pending:
                    finish_part(p, "skipped", f"global budget of {report['settings']['budget_s']:.0f} s spent")
                write_report(out, report)
                print_finished(report["parts"], shown)
                break
            run_child(out, pending[0]["env"], work, budget_end, log, shown)
    log.close()
    return read_report(out)


def run_child(out: Path, env_extra: dict, work: str, budget_end: float, log, shown: set) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", str(out), "--child", "--workdir", work,
           "--budget-end", str(budget_end), "--child-env", json.dumps(env_extra)]
    before = {n: p["status"] for n, p in read_report(out)["parts"].items()}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    killed = watch(proc, out, budget_end, shown)
    report = read_report(out)
    running = [p for p in report["parts"].values() if p["status"] == "running"]
    for p in running:
        if killed:
            finish_part(p, "timeout", killed, seconds=time.time() - p["started_unix"])
        else:
            finish_part(p, "failed", f"the child process exited with code {proc.returncode} (see {LOG_NAME})",
                        seconds=time.time() - p["started_unix"])
    progressed = any(before[n] != p["status"] for n, p in report["parts"].items())
    if not progressed:  # it died before starting a part (an import error, say): do not loop on it
        first = next(p for p in report["parts"].values() if p["status"] == "pending")
        finish_part(first, "failed", f"the child process exited with code {proc.returncode} before the part "
                                     f"started (see {LOG_NAME})")
    write_report(out, report)


def watch(proc: subprocess.Popen, out: Path, budget_end: float, shown: set | None = None) -> str | None:
    """Wait for the child; kill its process group when a part outlives its cap or the budget ends.

    `shown`: names of the parts already reported on stdout (updated in place)."""
    shown = set() if shown is None else shown
    while proc.poll() is None:
        time.sleep(0.5)
        now = time.time()
        parts = read_report(out)["parts"]
        shown |= print_finished(parts, shown)
        running = [p for p in parts.values() if p["status"] == "running"]
        reason = None
        if running and now > running[0]["started_unix"] + running[0]["cap_s"] + grace(running[0]["cap_s"]):
            reason = f"killed after {now - running[0]['started_unix']:.0f} s: over its cap of {running[0]['cap_s']:.0f} s"
        elif now > budget_end + grace(60):
            reason = "killed: the global budget ended while it ran"
        if reason:
            kill_group(proc)
            return reason
    return None


def print_finished(parts: dict, shown: set) -> set:
    """One stdout line per part that finished since the last look (the device tool returns stdout's tail)."""
    done = {n for n, p in parts.items() if p["status"] not in ("pending", "running")} - shown
    for name in done:
        p = parts[name]
        print(f"[gpu_check] {name}: {p['status']} in {p.get('seconds', 0):.0f} s"
              + (f" ({p['reason'][:160]})" if p.get("reason") else ""), flush=True)
    return done


def grace(cap_s: float) -> float:
    return max(10.0, 0.25 * cap_s)


def kill_group(proc: subprocess.Popen) -> None:
    """End the child and everything it started (compile workers, loader workers): its own process group."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- child -----------------------------------------------------------------------------------------------------

def child(out: Path, workdir: Path, budget_end: float, my_env: dict) -> int:
    from benchmarks.gpu_context import Context, SkipPart, log
    from benchmarks.gpu_parts import run_part

    report = read_report(out)
    ctx = Context(report["settings"], workdir, report)
    for name, part in report["parts"].items():
        if part["status"] != "pending":
            continue
        if part["env"] != my_env:
            return 0  # the supervisor starts a child with this part's environment
        left = budget_end - time.time()
        cap = min(part["cap_s"], left)
        if cap < report["settings"]["min_part_s"]:
            finish_part(part, "skipped", f"global budget: {max(left, 0):.0f} s left")
            write_report(out, report)
            continue
        part.update(status="running", started_unix=time.time(), cap_s=cap)
        write_report(out, report)
        log(f"part {name}: start (cap {cap:.0f} s)")
        t0 = time.monotonic()
        failed = False
        try:
            result = run_part(ctx, part["kind"], part["params"], deadline=t0 + cap)
            finish_part(part, "ok", result=result)
        except SkipPart as e:
            finish_part(part, "skipped", str(e))
        except Exception as e:  # recorded, and the next part runs in a fresh process
            traceback.print_exc()
            finish_part(part, "failed", f"{type(e).__name__}: {e}"[:2000])
            failed = True
        part["seconds"] = time.monotonic() - t0
        log(f"part {name}: {part['status']} in {part['seconds']:.1f} s" + (f" ({part['reason'][:200]})"
                                                                           if part.get("reason") else ""))
        write_report(out, report)
        if failed:
            return 3  # a CUDA error can poison this process's context
    return 0


# -- command line ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created): gpu_check.json, gpu_check.log, gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="every part at toy size on the CPU")
    p.add_argument("--budget-s", type=float, help="global time budget (default 420; smoke 600 as a hang guard)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, help="per-step batch of the throughput parts (default 256)")
    p.add_argument("--loader-workers", type=int, help="CPU-decode loader workers (default: CPUs - 2)")
    p.add_argument("--peak-tflops", help="MFU peak override: one number, or bf16=..,fp16=..,tf32=..,fp32=..")
    p.add_argument("--only", help="run only the parts whose name matches this regex")
    p.add_argument("--skip", help="skip the parts whose name matches this regex")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--budget-end", type=float, help=argparse.SUPPRESS)
    p.add_argument("--child-env", default="{}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict:
    s = dict(SMOKE if args.smoke else FULL)
    s.update(smoke=args.smoke, models=[m for m in args.models.split(",") if m], peak_tflops=args.peak_tflops,
             only=args.only, skip=args.skip)
    unknown = sorted(set(s["models"]) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; the check knows {', '.join(MODELS)}")
    for key in ("budget_s", "batch", "loader_workers"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["loader_workers"] is None:
        s["loader_workers"] = max(1, (os.cpu_count() or 2) - 2)
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.child:
        return child(out, Path(args.workdir), args.budget_end, json.loads(args.child_env))
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_from(args)
    report = {"schema": SCHEMA, "command": " ".join(["python -m benchmarks.gpu_check"] + (argv or sys.argv[1:])),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "smoke" if args.smoke else "full",
              "settings": settings, "parts": {p["name"]: p for p in plan(settings)}}
    write_report(out, report)
    report = supervise(out, report)
    from benchmarks.render_gpu import evaluate_goals, render

    counts: dict[str, int] = {}
    for p in report["parts"].values():
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    report.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=counts, goals=evaluate_goals(report))
    write_report(out, report)
    (out / MD_NAME).write_text(render(report))
    print(json.dumps({"out": str(out), "summary": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
