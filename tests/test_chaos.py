"""Fault injection on a local Ray (127.0.0.1) with 2 CPU workers and a moto S3 server on 127.0.0.1.

A killed driver and a resubmission, a storage outage during a checkpoint upload (and the run folder's own
backoff), a corrupt newest checkpoint, and SIGTERM to a worker (preemption). tests/test_train_ray.py covers
SIGKILLed workers and a stopped run.
Each test runs under a time limit and checks that it left no process behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import fsspec
import psutil
import pytest
import s3fs

from distributed import checkpoint as ckpt
from distributed.checkpoint import NAME, checkpoint_step
from distributed.metrics import read_metrics
from distributed.run_folder import RunFolder
from distributed.trainer import fit
from tests.conftest import _time_limit, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

OUTAGE_S = 8  # longer than pyarrow's default S3 retries ride out (about 6 s here)
GRACE_S = 20  # SIGTERM -> checkpoint on storage; Kubernetes gives 30 s by default, a spot reclaim 2 min


def checkpoint_names(fs, path: str) -> list[str]:
    """Checkpoint directory names under a run folder, oldest first."""
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if NAME.fullmatch(p.rstrip("/").rsplit("/", 1)[-1]))


def verifies(fs, path: str, tmp_path) -> bool:
    local = tmp_path / f"verify-{uuid.uuid4().hex[:6]}"
    fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    try:
        ckpt.verify_checkpoint(local)
        return True
    except ckpt.CheckpointError:
        return False
    finally:
        shutil.rmtree(local, ignore_errors=True)


def session_train_workers(ray_local) -> list[psutil.Process]:
    """RayTrainWorker processes of this test session's Ray (children of its raylet), not of any other Ray here."""
    node = ray_local._private.worker._global_node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    found = []
    for p in raylet.children():
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # exited (or a zombie) since children() listed it
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs; return those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(autouse=True)
def no_worker_left_behind(request):
    """After each test on the session's Ray: its training workers are gone (Ray Train ends them after fit)."""
    yield
    if "ray_local" in request.fixturenames:
        left = wait_gone([p.pid for p in session_train_workers(request.getfixturevalue("ray_local"))], timeout=30)
        assert not left, f"training worker processes outlived the test: {left}"


# -- the driver killed, the job resubmitted under the same name -------------------------------------------------

def processes_of(ray_tmp: str) -> list[psutil.Process]:
    """Every process of the subprocess's Ray: they all inherit RAY_TMPDIR, unique to this test."""
    found = []
    for p in psutil.process_iter(["environ"]):
        try:
            if (p.info["environ"] or {}).get("RAY_TMPDIR") == ray_tmp:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def reap(ray_tmp: str, timeout: float = 30.0) -> list[str]:
    """Wait for the processes of `ray_tmp`'s Ray to exit; SIGKILL and name those that outlive `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
        except psutil.Error:
            pass
    return names


@pytest.mark.long
def test_driver_killed_then_resubmitted_resumes_at_latest_checkpoint(shards, tmp_path, time_limit):
    storage, name = tmp_path / "runs", "driver-killed"
    run_dir = storage / name
    overrides = tiny_overrides(shards, str(storage), name, "run.max_failures=0")
    cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/demo.yaml",
           *[a for o in overrides for a in ("--set", o)]]
    # The job starts its own local Ray: give it a temp dir of its own (short: Ray's socket paths must stay under
    # 108 bytes), so it never joins this session's Ray and its processes can be told apart by environment.
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        with time_limit(150, "first launch until its first checkpoint"), open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            while not any((run_dir / n / "manifest.rank0.json").exists() for n in checkpoint_names(
                    fsspec.filesystem("file"), str(run_dir))):
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.05)
            os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray head processes it started
            first.wait(timeout=10)
        left = reap(ray_tmp)
        assert not left, f"processes outlived the killed driver: {left}"
        fs = fsspec.filesystem("file")
        good = [n for n in checkpoint_names(fs, str(run_dir)) if verifies(fs, str(run_dir / n), tmp_path)]
        latest = good[-1]
        with time_limit(240, "the resubmitted job"):
            second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=230)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        assert summary["started_from"] == f"run:{latest}", (summary, good)
        assert summary["steps"] == 8 and summary["epochs"] == 2 and summary["failures_survived"] == 0
        attempts = RunFolder(str(run_dir)).read_jsonl("attempts.jsonl")
        launches = list(dict.fromkeys(a["launch_id"] for a in attempts))
        assert len(launches) == 2
        resumed = [a for a in attempts if a["launch_id"] == launches[1]]
        assert resumed[0]["restored_step"] == checkpoint_step(latest) >= 2
        left = reap(ray_tmp)
        assert not left, f"processes outlived the resubmitted job: {left}"
    finally:
        reap(ray_tmp, timeout=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- object storage goes away during a checkpoint upload; then the newest checkpoint is corrupted ------------------

@pytest.fixture(scope="module")
def outage_run(ray_local, s3_server, shards, tiny_config):
    """A 2-epoch run with data and checkpoints on S3; S3 is down for OUTAGE_S from the step-2 checkpoint on."""
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(shards, f"{bucket}/shards", recursive=True)
    # Straight to moto, past the proxy that stop() closes: what storage holds while clients cannot reach it.
    backend = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.backend_endpoint}, skip_instance_cache=True)
    run = RunFolder(f"s3://{bucket}/runs/outage")
    facts: dict = {}

    # The outage starts at the first request that uploads a file of the step-2 checkpoint (path-style URLs, as
    # s3fs and pyarrow send them to an endpoint): that request is cut, whichever file it carries.
    step2 = f"{bucket}/runs/outage/{ckpt.checkpoint_dir_name(2)}"
    tripped = s3_server.stop_on(rb"(PUT|POST) /" + step2.encode() + rb"/")

    def outage():
        if not tripped.wait(timeout=150):
            return
        facts["start"] = time.monotonic()
        facts["manifest_there_at_start"] = backend.exists(f"{step2}/manifest.rank0.json")
        time.sleep(OUTAGE_S)
        s3_server.start()
        facts["end"] = time.monotonic()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    # num_to_keep=10: keep every checkpoint, to check each one (Ray would retire the step-2 one at 3).
    cfg = tiny_config(f"s3://{bucket}/shards", f"s3://{bucket}/runs", "outage", "run.num_to_keep=10")
    try:
        with _time_limit(200, "the run with a storage outage"):
            summary = fit(cfg)
    finally:
        s3_server.stop_on(None)
        thread.join(timeout=OUTAGE_S + 5)
        s3_server.start()  # whatever happened, storage comes back for the other tests
    return {"summary": summary, "bucket": bucket, "cfg": cfg, "run": run, "facts": facts, "tiny_config": tiny_config}


def test_storage_outage_during_checkpoint_upload_is_ridden_out(outage_run, tmp_path):
    summary, facts, bucket = outage_run["summary"], outage_run["facts"], outage_run["bucket"]
    assert "end" in facts and facts["end"] - facts["start"] >= OUTAGE_S
    # Storage went away before the step-2 checkpoint was complete there; the upload waited and finished.
    assert facts["manifest_there_at_start"] is False
    assert summary["steps"] == 8 and summary["epochs"] == 2 and summary["failures_survived"] == 0
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    names = checkpoint_names(fs, f"{bucket}/runs/outage")
    assert names == [ckpt.checkpoint_dir_name(s) for s in (2, 4, 6, 8)]
    # No partial checkpoint anywhere: every directory Ray reported verifies, sizes and sha256.
    assert all(verifies(fs, f"{bucket}/runs/outage/{n}", tmp_path) for n in names)
    run = outage_run["run"]
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "eval"] == [4, 8]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(outage_run, capfd, tmp_path, time_limit):
    bucket, cfg = outage_run["bucket"], outage_run["cfg"]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    folder = f"{bucket}/runs/outage"
    *_, previous, newest = checkpoint_names(fs, folder)
    state = f"{folder}/{newest}/state.pt"
    fs.pipe(state, fs.cat(state)[: fs.size(state) // 2])  # truncated, as by an interrupted copy
    with time_limit(150, "the resumed run"):
        summary = fit(cfg)
    out = capfd.readouterr().out
    assert f"skipping checkpoint s3://{folder}/{newest}" in out and "manifest says" in out  # names URL and size
    assert summary["started_from"] == f"run:{previous}"
    assert summary["steps"] == 8 and summary["epochs"] == 2
    attempts = outage_run["run"].read_jsonl("attempts.jsonl")
    assert attempts[-1]["restored_step"] == checkpoint_step(previous)
    # The new step-8 checkpoint went to a directory of its own, not into the corrupt one Ray still tracks.
    fs.invalidate_cache()
    final = summary["checkpoint"].rsplit("/", 1)[-1]
    assert final.startswith(newest + "-") and verifies(fs, f"{folder}/{final}", tmp_path)


def test_run_folder_retries_with_backoff_through_an_outage(s3_bucket, s3_server, monkeypatch, capsys,
                                                           time_limit):
    """The run folder's own backoff, with the S3 client's retries off (AWS_MAX_ATTEMPTS=1)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    run = RunFolder(f"s3://{s3_bucket}/runs/x")
    run.write_text("a.txt", "before")
    s3_server.stop()
    back = threading.Timer(4, s3_server.start)
    back.start()
    try:
        with time_limit(60, "writing through the outage"):
            start = time.monotonic()
            run.write_text("a.txt", "after")  # waits for storage: 1, 2, 4 s of backoff
            assert time.monotonic() - start >= 3.5 and run.read_text("a.txt") == "after"
            assert "storage: writing a.txt to s3://" in capsys.readouterr().out
            start = time.monotonic()
            assert run.read_text("missing.txt") is None  # an answer, not an outage: no retry
            assert time.monotonic() - start < 1
    finally:
        back.join()
        s3fs.S3FileSystem.clear_instance_cache()


# -- preemption: SIGTERM to one worker ----------------------------------------------------------------------------

@pytest.mark.long
def test_sigterm_to_a_worker_saves_a_checkpoint_and_the_run_resumes_from_it(ray_local, shards, tiny_config,
                                                                          tmp_path, time_limit):
    storage = str(tmp_path / "runs")
    run_dir = tmp_path / "runs" / "preempted"
    fs = fsspec.filesystem("file")
    seen: dict = {}

    def preempt():
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:  # after the epoch-1 checkpoint (step 4), in the middle of epoch 2
            workers = session_train_workers(ray_local)
            if (run_dir / ckpt.checkpoint_dir_name(4) / "manifest.rank0.json").exists() and len(workers) == 2:
                victim = workers[-1]
                victim.send_signal(signal.SIGTERM)
                seen["pid"], seen["time"] = victim.pid, time.monotonic()
                break
            time.sleep(0.05)
        while time.monotonic() < deadline and "saved" not in seen:  # the checkpoint the SIGTERM asked for
            for n in checkpoint_names(fs, str(run_dir)):
                if checkpoint_step(n) > 4 and (run_dir / n / "manifest.rank0.json").exists():
                    seen["saved"], seen["saved_after_s"] = n, time.monotonic() - seen["time"]
            time.sleep(0.05)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    # Checkpoints only at epoch ends (steps 4, 8, 12), so a mid-epoch one can only come from the SIGTERM.
    # num_to_keep=10: Ray would retire the SIGTERM (recovery) checkpoint once it is no longer the latest.
    cfg = tiny_config(shards, storage, "preempted", "schedule.epochs=3", "run.checkpoint_every_steps=100",
                      "run.log_every_steps=1", "run.max_failures=1", "run.num_to_keep=10")
    with time_limit(200, "the preempted run"):
        summary = fit(cfg)
    thread.join(timeout=5)
    assert "pid" in seen and "saved" in seen, seen
    assert seen["saved_after_s"] < GRACE_S, seen
    assert summary["failures_survived"] == 1 and summary["steps"] == 12 and summary["epochs"] == 3
    attempts = RunFolder(str(run_dir)).read_jsonl("attempts.jsonl")
    step = checkpoint_step(seen["saved"])
    assert attempts[1]["restored_from"] == f"run:{seen['saved']}" and attempts[1]["restored_step"] == step > 4
    assert verifies(fs, str(run_dir / seen["saved"]), tmp_path)
    assert not wait_gone([seen["pid"]], timeout=20), "the SIGTERMed worker outlived the run"
