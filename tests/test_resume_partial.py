"""Resume's choice when the run folder holds only checkpoints that do not verify (distributed/resume.py)."""
from __future__ import annotations

import torch

from distributed import checkpoint as ckpt
from distributed.resume import _choose


def _partial_checkpoint(run, step: int):
    """A checkpoint whose manifest landed but whose state.pt did not (an upload cut short)."""
    directory = run / ckpt.checkpoint_dir_name(step)
    directory.mkdir(parents=True)
    ckpt.save_state(directory, {"step": step, "weights": torch.zeros(4)})
    ckpt.write_manifest(directory, rank=0, world_size=1)
    (directory / ckpt.STATE_FILE).unlink()
    return directory.name


def test_partial_uploads_that_ray_never_registered_start_from_scratch(tmp_path, capsys):
    run = tmp_path / "run"
    _partial_checkpoint(run, 4)
    assert _choose(str(run), None, None, str(tmp_path / "local")) == ("scratch",)
    assert "Ray Train registered none of them" in capsys.readouterr().out


def test_a_registered_checkpoint_that_does_not_verify_is_an_error(tmp_path):
    run = tmp_path / "run"
    name = _partial_checkpoint(run, 4)
    decision = _choose(str(run), None, name, str(tmp_path / "local"))
    assert decision[0] == "error" and f"no checkpoint under {run} verifies (tried {name})" == decision[1]
