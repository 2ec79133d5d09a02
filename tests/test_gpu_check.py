"""The GPU device check (benchmarks.gpu_check): smoke mode on the CPU, the supervisor's time-boxing, the goals.

The smoke run is the CPU stand-in for the device: every part runs at toy size, or is skipped with its reason
(fp16, GPU decode: CUDA-only; torch.compile: minutes of CPU compile). It also runs DeepSpeed ZeRO-1/2 with
channels_last, which failed before the fix in DeepSpeedStrategy (see test_deepspeed_strategy_with_channels_last).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.render_gpu import evaluate_goals, render

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SKIP_REASONS = ("CUDA-only", "smoke mode")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _run_check(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(out), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    # The budget is a hang guard only: on a CPU shared by several jobs the smoke run can take minutes.
    proc = _run_check(out, "--smoke", "--budget-s", "3000", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, json.loads((out / gpu_check.JSON_NAME).read_text())


@pytest.mark.long
def test_smoke_every_part_ran_or_says_why_not(smoke):
    out, report = smoke
    assert report["schema"] == gpu_check.SCHEMA and report["mode"] == "smoke"
    planned = [p["name"] for p in gpu_check.plan(gpu_check.settings_from(gpu_check.parse_args([str(out), "--smoke"])))]
    assert list(report["parts"]) == planned
    kinds = {p["kind"] for p in report["parts"].values()}
    assert kinds == {"env", "train", "input", "resume", "profile", "strategy"}
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("status"), part.get("reason"))
        assert part["seconds"] >= 0
        if part["status"] == "ok":
            assert isinstance(part["result"], dict) and part["result"], name
        else:
            assert part["reason"].startswith(SMOKE_SKIP_REASONS), (name, part["reason"])
    skipped = {n for n, p in report["parts"].items() if p["status"] == "skipped"}
    assert skipped == {"input/gpu", "train/se_googlenet/fp16/cl/eager"} | {
        n for n in report["parts"] if n.endswith("/compile")}
    assert report["summary"] == {"ok": len(planned) - len(skipped), "skipped": len(skipped)}


@pytest.mark.long
def test_smoke_results_hold_the_figures(smoke):
    _, report = smoke
    parts = {n: p.get("result") for n, p in report["parts"].items()}
    env = parts["env"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["peaks"]["bf16"]["tflops"] is None and "--peak-tflops" in env["peaks"]["bf16"]["source"]
    assert env["flops"]["se_googlenet"]["train_step"] == 3 * env["flops"]["se_googlenet"]["forward_train"] > 0
    train = parts["train/se_googlenet/bf16/cl/eager"]
    assert train["images_per_s"] > 0 and train["timed_steps"] == 2 and train["mfu"] is None
    assert train["checkpoint"]["mb"] > 1 and train["checkpoint"]["save_s"] > 0
    assert parts["train/se_googlenet/bf16/nocl/eager"]["channels_last"] is False
    cpu_input = parts["input/cpu"]
    assert cpu_input["loader_workers"] == 2 and cpu_input["images_per_s"] > 0 and cpu_input["vs_synthetic"] > 0
    assert cpu_input["shards"]["bytes_per_image"] > 10_000  # 500x375 JPEGs
    resume = parts["resume"]
    assert resume["steps"] == 4 and resume["checkpoint_at"] == 2
    assert resume["equal_within_tolerance"] and resume["max_abs_diff_resumed"] <= resume["tolerance"]
    profile = parts["profile/se_googlenet"]
    assert profile["top"] and abs(sum(profile["by_kind"].values()) - 1) < 1e-6
    ddp = parts["strategy/ddp"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1 and ddp["images_per_s"] > 0
    for zero in (1, 2):  # DeepSpeed is a project dependency, so it runs here too
        assert parts[f"strategy/zero{zero}"]["zero_stage"] == zero


@pytest.mark.long
def test_smoke_writes_the_log_and_the_markdown(smoke):
    out, report = smoke
    log = (out / gpu_check.LOG_NAME).read_text()
    assert "part resume: ok" in log
    md = (out / gpu_check.MD_NAME).read_text()
    assert md == render(report)
    assert "### Goals" in md and "input/gpu: skipped (CUDA-only" in md
    assert len(report["goals"]) == 4


def test_plan_has_unique_names_and_filters_keep_env(tmp_path):
    settings = gpu_check.settings_from(gpu_check.parse_args([str(tmp_path), "--only", "resume"]))
    assert [p["name"] for p in gpu_check.plan(settings)] == ["env", "resume"]
    full = gpu_check.plan(gpu_check.settings_from(gpu_check.parse_args([str(tmp_path)])))
    assert full[0]["name"] == "env" and len({p["name"] for p in full}) == len(full)
    assert next(p for p in full if p["name"] == "resume")["env"] == gpu_check.DETERMINISTIC_ENV
    assert "train/se_googlenet/bf16/cl/eager/b32" in {p["name"] for p in full}
    with pytest.raises(SystemExit, match="unknown alexnet"):
        gpu_check.settings_from(gpu_check.parse_args([str(tmp_path), "--models", "alexnet"]))


def test_a_part_over_its_cap_is_killed_with_its_process_group(tmp_path):
    report = {"parts": {"slow": {"status": "running", "started_unix": time.time() - 100, "cap_s": 1.0}}}
    gpu_check.write_report(tmp_path, report)
    script = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); print(p.pid, flush=True); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    reason = gpu_check.watch(proc, tmp_path, budget_end=time.time() + 600)
    assert reason.startswith("killed after") and "over its cap of 1 s" in reason
    assert proc.poll() is not None
    for _ in range(50):  # the grandchild went with its group (it may linger a moment as a zombie of init)
        if not os.path.exists(f"/proc/{grandchild}") or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} of the killed child's group is still running")


def _report(parts: dict) -> dict:
    return {"parts": {n: {"status": "ok", "kind": n.split("/")[0], "result": r} for n, r in parts.items()}}


def test_goals_are_judged_from_the_results():
    h200 = {"device": "NVIDIA H200", "peaks": {"bf16": {"tflops": 989.5}}}
    report = _report({"env": h200,
                      "train/se_googlenet/bf16/cl/eager": {"mfu": 0.30, "images_per_s": 10000.0, "step_ms": 25.6,
                                                           "precision": "bf16"},
                      "train/googlenet/bf16/cl/eager": {"mfu": 0.31, "images_per_s": 11000.0, "step_ms": 23.0,
                                                        "precision": "bf16"},
                      "train/resnet50/bf16/cl/eager": {"mfu": 0.2, "images_per_s": 7000.0, "step_ms": 36.6,
                                                       "precision": "bf16"},
                      "input/gpu": {"images_per_s": 9500.0}})
    mfu, data, se, rn50 = evaluate_goals(report)
    assert (mfu["measured"], mfu["met"]) == (0.30, True)
    assert data["measured"] == pytest.approx(0.95) and data["met"] is True
    assert se["measured"] == pytest.approx(25.6 / 23.0) and se["met"] is False  # 1.113 > 1.10
    assert rn50["target"] == pytest.approx(2470 * 989.5 / 312) and rn50["met"] is False  # 7,000 < 7,833
    del report["parts"]["input/gpu"]
    assert evaluate_goals(report)[1]["met"] is None and "not planned" in evaluate_goals(report)[1]["detail"]


def test_deepspeed_strategy_with_channels_last(tmp_path):
    """DeepSpeed's initial broadcast views parameters as bytes, which channels_last strides refused: the
    se_googlenet_deepspeed config (channels_last: true) failed at deepspeed.initialize. Own process: it sets up
    torch.distributed."""
    pytest.importorskip("deepspeed")
    code = (
        "import torch\n"
        "from benchmarks import gpu_adapters as a\n"
        "device = torch.device('cpu')\n"
        "a.init_process_group(device)\n"
        "for stage in (1, 2):\n"
        "    cfg = a.make_config('se_googlenet', 'bf16', 2, 32, channels_last=True, strategy='deepspeed',"
        " zero_stage=stage)\n"
        "    strategy = a.build_strategy(cfg, a.build_model(cfg), device, 10)\n"
        "    strategy.train(True)\n"
        "    loss = a.train_step(cfg, strategy, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))\n"
        "    assert torch.isfinite(loss), loss\n"
        "print('trained')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_check_on_the_gpu(tmp_path):
    proc = _run_check(tmp_path, "--budget-s", "300", "--only", r"^(train/se_googlenet/bf16/cl/eager|input/gpu|resume)$",
                      timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())["parts"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p.get("reason") for n, p in parts.items()}
    train = parts["train/se_googlenet/bf16/cl/eager"]["result"]
    assert train["images_per_s"] > 0 and train["peak_memory_gib"] > 0
    if parts["env"]["result"]["peaks"]["bf16"]["tflops"]:
        assert 0 < train["mfu"] < 1
    assert parts["resume"]["result"]["equal_within_tolerance"]
