"""The `ray job submit` workflow of docs/jobs.md, run for real against a local Ray head on 127.0.0.1.

The head runs with token auth (its own token, never ~/.ray/auth_token), its own temp dir and free ports, so
it lives beside the suite's in-process `ray_local` and any other Ray on the machine. It is stopped by
SIGTERM to its `ray start --block` process, not `ray stop`: `ray stop` kills every Ray process on the
machine by name. The working-dir upload limit (100 MiB) is checked with Ray's own packaging code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml

from distributed import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/: its `ray`, and the `python` a job's entrypoint runs
RAY = str(BIN / "ray")
UPLOAD_LIMIT = 100 * 1024**2  # ray_constants.DASHBOARD_CLIENT_MAX_SIZE
TEST_BUDGET_S = 240  # 150-200 s measured on 2 cores shared with other training; a hung job fails, not stalls

# The entrypoint resources of docs/cluster.md: the driver takes 1 CPU and 1 `head` slot, never a GPU slot.
SUBMIT = ["job", "submit", "--working-dir", ".", "--runtime-env", "runtime_env.yaml",
          "--entrypoint-num-cpus=1", '--entrypoint-resources={"head": 1}']
# 3 classes x 24 train images (one truncated, dropped by prepare): 71 -> 4 steps/epoch at global batch 16 (8 per rank).
TINY = ["data.image_size=32", "data.global_batch_size=16", "data.eval_batch_size=16", "schedule.epochs=4",
        "schedule.warmup_epochs=0.5", "run.checkpoint_every_steps=2", "run.log_every_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """`ray start --head --block` on loopback with token auth; `stop()` ends it and everything it started."""

    def __init__(self, token_home: Path):
        self.token_home = token_home
        self.token_path = token_home / ".ray" / "auth_token"
        # Short path: Ray's unix sockets live under it (107-byte limit), so not pytest's long tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None
        self.log = Path(self.temp_dir) / "head.log"

    def env(self, **extra: str) -> dict:
        """The environment of every `ray` command: this head's token, the venv first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def ray(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        """Run `ray ARGS` from the repository root against this head; return stdout and stderr together."""
        p = subprocess.run([RAY, *args], cwd=REPO, env=self.env(RAY_ADDRESS=self.address), timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"`ray {' '.join(args)}` exited {p.returncode}:\n{p.stdout[-4000:]}")
        return p.stdout

    def start(self) -> None:
        # `ray get-auth-token --generate` writes to $HOME/.ray/auth_token: give it a HOME of its own.
        gen_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        gen_env.update(HOME=str(self.token_home), RAY_AUTH_MODE="token")
        subprocess.run([RAY, "get-auth-token", "--generate"], env=gen_env, check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.token_path.chmod(0o600)
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--port={_free_port()}", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               # As cluster.yaml's head: `head: 2` driver slots. 3 CPUs = 1 driver + 2 training workers.
               "--num-cpus=3", "--num-gpus=0", '--resources={"head": 2}',
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        # No 30 s drain on SIGTERM (ray/_private/node.py): nothing here to drain.
        env = self.env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            if self.api("/api/jobs/", token=True)[0] == 200:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the job API at {self.address} did not come up:\n{self.log.read_text()[-4000:]}")

    def api(self, path: str, token: bool) -> tuple[int, object]:
        """GET the dashboard's REST API, with or without the token; (HTTP status, JSON or None)."""
        req = urllib.request.Request(self.address + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except OSError:
            return 0, None

    def _ours(self) -> list[psutil.Process]:
        """Processes of this head: descendants of `ray start`, or any naming its temp dir or token file."""
        found = {}
        if self.proc is not None:
            try:
                head = psutil.Process(self.proc.pid)
                found = {p.pid: p for p in [head, *head.children(recursive=True)]}
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                if p.pid not in found and (self.temp_dir in cmdline or
                                           p.environ().get("RAY_AUTH_TOKEN_PATH") == str(self.token_path)):
                    found[p.pid] = p
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self) -> list[str]:
        """SIGTERM `ray start --block` (it stops its processes), kill stragglers; return what was still left."""
        procs = self._ours()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        if self.proc is not None:
            self.proc.wait(timeout=5)
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self._ours() if p.is_running()]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def status_in(out: str, job_id: str) -> str:
    """The job status as `ray job status` and a blocking `ray job submit` print it (job/cli.py: _log_job_status)."""
    for pattern, status in ((rf"Job '{job_id}' succeeded", "SUCCEEDED"), (rf"Job '{job_id}' was stopped", "STOPPED"),
                            (rf"Job '{job_id}' failed", "FAILED"), (rf"Status for job '{job_id}': (\w+)", None)):
        m = re.search(pattern, out)
        if m:
            return status or m.group(1)
    raise AssertionError(f"no status of job {job_id} in:\n{out[-4000:]}")


def wait_for_checkpoint(head: LocalHead, run_dir: Path, job_id: str, deadline: float) -> None:
    """Until Ray Train has registered a checkpoint of the run (its snapshot lists one): resumable from here."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    polls = 0
    while time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        polls += 1
        if polls % 10 == 0:  # every 2 s: a job that already ended will never write one
            status, info = head.api(f"/api/jobs/{job_id}", token=True)
            if status == 200 and info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint registered in {run_dir}; job logs:\n{head.ray('job', 'logs', job_id)[-4000:]}")


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AssertionError(f"the test ran past its {TEST_BUDGET_S} s budget")
    return left


@pytest.mark.long
@pytest.mark.slow
def test_submit_prepare_train_stop_and_resume(tmp_path):
    deadline = time.monotonic() + TEST_BUDGET_S
    raw, shards, runs = tmp_path / "raw", tmp_path / "shards", tmp_path / "runs"
    subprocess.run([sys.executable, "-m", "jobs.make_sample", "--out", str(raw), "--classes", "3", "--per-class",
                    "24", "--val-per-class", "8", "--test", "4"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    train = ["python", "-m", "jobs.train", "--config", "configs/demo.yaml", "--set", f"data.url={shards}",
             "--set", f"run.storage_path={runs}", "--set", "run.name=submitted"]
    for override in TINY:
        train += ["--set", override]
    run_dir = runs / "submitted"

    head = LocalHead(tmp_path / "home")
    try:
        head.start()
        # Token auth is on: the job API refuses a request without the token.
        assert head.api("/api/jobs/", token=False)[0] == 401

        # 1. prepare: blocking submit (streams the logs, returns when the job ends).
        out = head.ray(*SUBMIT, "--submission-id", "prepare", "--", "python", "-m", "jobs.prepare", "--src", str(raw),
                       "--dst", str(shards), timeout=remaining(deadline))
        assert status_in(out, "prepare") == "SUCCEEDED"
        assert (shards / "_index.json").is_file()

        # 2. train, stopped with `ray job stop` once a checkpoint is registered.
        head.ray(*SUBMIT, "--no-wait", "--submission-id", "train-1", "--", *train)
        wait_for_checkpoint(head, run_dir, "train-1", deadline)
        head.ray("job", "stop", "train-1", timeout=remaining(deadline))
        status = status_in(head.ray("job", "status", "train-1"), "train-1")
        assert status == "STOPPED", f"{status}: the run ended before `ray job stop`; lengthen it"
        assert not (run_dir / "summary.json").exists()
        logs1 = head.ray("job", "logs", "train-1")
        assert "epoch 1/4 step 1/16 loss" in logs1 and "(step 0, from scratch)" in logs1, logs1[-4000:]

        # 3. the same entrypoint again, same run name: resumes from the run's checkpoint and finishes.
        logs2 = head.ray(*SUBMIT, "--submission-id", "train-2", "--", *train, timeout=remaining(deadline))
        assert status_in(logs2, "train-2") == "SUCCEEDED"  # a blocking submit streams the job's logs
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["started_from"].startswith("run:checkpoint_"), summary
        assert summary["epochs"] == 4 and summary["steps"] == 16 and summary["world_size"] == 2
        assert summary["checkpoint"] == str(run_dir / "checkpoint_0000000016")
        ckpt.verify_checkpoint(summary["checkpoint"])
        attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
        assert [a["restored_from"] for a in attempts] == ["scratch", summary["started_from"]]
        assert attempts[1]["restored_step"] > 0 and attempts[0]["launch_id"] != attempts[1]["launch_id"]
        assert f"from {summary['started_from']})" in logs2 and "epoch 4/4 step 16/16 loss" in logs2, logs2[-4000:]
        last_json = [line for line in logs2.splitlines() if line.startswith("{")][-1]
        assert json.loads(last_json) == summary  # the driver's last line is the saved summary
    finally:
        left = head.stop()
    assert not left, f"processes left behind by the test's Ray head: {left}"


def _package(root: Path, tmp: Path, include_gitignore: bool, excludes: list[str]) -> zipfile.ZipFile:
    from ray._private.runtime_env.packaging import create_package

    out = Path(tempfile.mkdtemp(dir=tmp)) / "package.zip"  # create_package skips an existing target
    create_package(str(root), out, include_gitignore=include_gitignore, excludes=excludes)
    assert out.stat().st_size < UPLOAD_LIMIT, f"{out.stat().st_size} bytes"
    return zipfile.ZipFile(out)


def test_working_dir_upload_stays_under_the_limit(tmp_path):
    """Package a copy of the repo as `ray job submit --working-dir .` would, with 101 MiB of random bytes in each
    of runs/, demo_data/, .venv/ and .git/: none of it is uploaded, with or without .gitignore and Ray's defaults."""
    from ray._private import ray_constants

    root = tmp_path / "repo"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "demo_data", "__pycache__",
                                                             ".pytest_cache"))
    big = root / "runs" / "demo" / "checkpoint_0000000050" / "state.pt"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(101 * 1024**2))  # incompressible
    for other in ("demo_data/shards/train-000000.tar", ".venv/lib/big.so", ".git/objects/pack/big.pack"):
        (root / other).parent.mkdir(parents=True)
        os.link(big, root / other)  # same bytes, no extra disk
    excludes = yaml.safe_load((REPO / "runtime_env.yaml").read_text())["excludes"]

    # As `ray job submit` packages it by default: .gitignore, Ray's default excludes, then runtime_env.yaml's.
    default = _package(root, tmp_path, True, ray_constants.get_runtime_env_default_excludes() + excludes)
    # runtime_env.yaml alone (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES='').
    alone = _package(root, tmp_path, False, excludes)
    for package in (default, alone):
        names = package.namelist()
        assert {"jobs/train.py", "jobs/prepare.py", "configs/demo.yaml", "runtime_env.yaml"} <= set(names)
        assert not [n for n in names if n.split("/")[0] in ("runs", "demo_data", ".venv", ".git")]
