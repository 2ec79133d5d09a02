"""`make demo`'s output, as a person reads it: the project's lines stand out, Ray's routine lines are gone.

Runs `python -m jobs.demo` (the same entry point, the same init_ray) on the tiny shards of conftest, 2 epochs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import TINY
from jobs import demo
from jobs.demo import next_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.long
@pytest.mark.slow
def test_demo_output_is_the_projects_lines_without_rays_routine_ones(shards, tmp_path):
    overrides = [f"data.url={shards}", f"run.storage_path={tmp_path}", "run.name=quiet", *TINY]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = REPO
    cmd = [sys.executable, "-m", "jobs.demo", *sum((["--set", o] for o in overrides), [])]
    # A hang guard only (the run takes 1-5 minutes on a shared 2-core machine).
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=1200)
    lines = p.stdout.splitlines()
    assert p.returncode == 0, "\n".join(lines[-80:])

    # Ray's routine lines: none from the PlacementGroupCleaner (it reaches the State API of this run's own
    # dashboard), none of Ray Train's per-report lines, none of its per-checkpoint lines.
    for noise in ("PlacementGroupCleaner", "State API may be temporarily unavailable", "Reporting training result",
                  "Checkpoint successfully created"):
        assert not [line for line in lines if noise in line], noise

    # The project's lines are there, without Ray's "(RayTrainWorker pid=...)" prefix.
    assert any(re.fullmatch(r"Ray: started a local Ray on 127\.0\.0\.1 .*dashboard http://127\.0\.0\.1:\d+ .*", line)
               for line in lines), lines
    progress = [line for line in lines if re.fullmatch(r"epoch \d/2 step \d+/8 loss \S+ lr .*", line)]
    evaluations = [line for line in lines if re.fullmatch(r"epoch \d/2: val top-1 \S+ top-5 .*", line)]
    assert len(progress) == 4 and len(evaluations) == 2, lines
    at = max(i for i, line in enumerate(lines) if line.startswith("{"))
    assert json.loads(lines[at])["steps"] == 8
    # Then what to run next.
    assert lines[at + 1:at + 3] == next_steps(f"{tmp_path}/quiet"), lines[at:]


def test_next_steps_name_the_commands_for_the_run_folder():
    evaluate, curves = next_steps("runs/demo")
    assert "python -m jobs.evaluate --checkpoint runs/demo" in evaluate
    assert "python -m jobs.predict --checkpoint runs/demo --split test --out runs/demo/submission.csv" in evaluate
    assert "tensorboard --logdir runs/demo/tensorboard" in curves


def test_old_layout_demo_data_gets_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    """A demo_data/shards from an earlier version (index.json, not _index.json): the demo names it and the fix,
    before it starts Ray or writes anything."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text("{}")
    monkeypatch.chdir(REPO)  # the demo's config path is relative to the repository
    code = demo.main(["--set", f"data.url={shards}", "--set", f"run.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {shards} holds shards prepared by an older version of this project (index.json" in err
    assert f"rm -rf {shards} {tmp_path / 'runs'}/demo && make demo" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # nothing written, no run folder
