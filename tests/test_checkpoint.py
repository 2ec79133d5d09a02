"""The checkpoint format: every field round-trips, manifests catch truncation and corruption, loads are safe."""
import json
import pickle

import pytest
import torch

from distributed import checkpoint as ckpt
from distributed.config import load_config
from distributed.loss import compute_loss
from distributed.optim import build_optimizer, lr_factor
from distributed.strategies import DDPStrategy
from models import get_model


def _strategy(cfg):
    torch.manual_seed(0)
    model = get_model(cfg.model.name, num_classes=4, **cfg.model.kwargs)
    return DDPStrategy(cfg, model, torch.device("cpu"), steps_per_epoch=10)


def _train_steps(strategy, cfg, n):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        images = torch.randn(4, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 4, (4,), generator=gen)
        strategy.step(compute_loss(cfg, strategy.forward(images), labels))


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_ddp_checkpoint_round_trips_every_field(tmp_path):
    cfg = load_config("configs/demo.yaml", ["model.name=resnet18", "model.kwargs={}", "optim.ema_decay=0.9"])
    src = _strategy(cfg)
    _train_steps(src, cfg, 3)
    extra = {"epoch": 1, "samples": 48, "step": 13, "best_top1": 0.5, "config": cfg.to_dict(),
             "rng": {"torch": torch.get_rng_state()}, "launch_id": "abc"}
    src.save(tmp_path, extra, rank=0)
    ckpt.write_manifest(tmp_path, rank=0, world_size=1)
    dst = _strategy(load_config("configs/demo.yaml", ["model.name=resnet18", "model.kwargs={}",
                                                       "optim.ema_decay=0.9", "run.seed=5"]))
    ckpt.verify_checkpoint(tmp_path)
    state = dst.load(tmp_path)
    for key, value in extra.items():
        _assert_same(value, state[key], key)
    _assert_same(src.module.state_dict(), dst.module.state_dict(), "model")
    _assert_same(src.optimizer.state_dict(), dst.optimizer.state_dict(), "optimizer")
    _assert_same(src.ema.module.state_dict(), dst.ema.module.state_dict(), "ema")
    # Both continue identically.
    _train_steps(src, cfg, 1)
    _train_steps(dst, cfg, 1)
    _assert_same(src.module.state_dict(), dst.module.state_dict(), "model after a step")


def _tiny_checkpoint(directory):
    ckpt.save_state(directory, {"step": 7, "weights": torch.arange(1000.0)})
    ckpt.write_manifest(directory, rank=0, world_size=1)


def test_truncated_checkpoint_is_detected(tmp_path):
    _tiny_checkpoint(tmp_path)
    path = tmp_path / ckpt.STATE_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match="bytes, manifest says"):
        ckpt.load_state(tmp_path)


def test_corrupt_checkpoint_is_detected(tmp_path):
    _tiny_checkpoint(tmp_path)
    path = tmp_path / ckpt.STATE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_state(tmp_path)


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    ckpt.save_state(tmp_path, {"step": 1})
    with pytest.raises(ckpt.CheckpointError, match="no manifest"):
        ckpt.load_state(tmp_path)


def test_missing_rank_manifest_is_incomplete(tmp_path):
    ckpt.save_state(tmp_path, {"step": 1})
    ckpt.write_manifest(tmp_path, rank=0, world_size=2, writers=2)
    with pytest.raises(ckpt.CheckpointError, match="manifest.rank1.json missing"):
        ckpt.verify_checkpoint(tmp_path)


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import os; os.environ['PWNED'] = '1'",))

    with open(tmp_path / ckpt.STATE_FILE, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    ckpt.write_manifest(tmp_path, rank=0, world_size=1)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_state(tmp_path)
    import os

    assert "PWNED" not in os.environ


def test_manifest_lists_sizes_and_hashes(tmp_path):
    _tiny_checkpoint(tmp_path)
    manifest = json.loads((tmp_path / "manifest.rank0.json").read_text())
    assert manifest["files"][ckpt.STATE_FILE]["bytes"] == (tmp_path / ckpt.STATE_FILE).stat().st_size
    assert len(manifest["files"][ckpt.STATE_FILE]["sha256"]) == 64


def test_lr_schedule_warmup_then_cosine_and_step():
    cfg = load_config(None, ["schedule.epochs=10", "schedule.warmup_epochs=1"])
    factors = [lr_factor(s, cfg, steps_per_epoch=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warm-up
    assert factors[-1] < 0.01
    step = load_config(None, ["schedule.decay=step", "schedule.warmup_epochs=0", "schedule.step_epochs=[3, 6]"])
    assert [lr_factor(s, step, 10) for s in (0, 29, 30, 60)] == pytest.approx([1, 1, 0.1, 0.01])


def test_no_weight_decay_on_norm_and_bias():
    cfg = load_config(None, ["model.name=resnet50"])
    model = get_model("resnet50", num_classes=4)
    opt = build_optimizer(cfg, model)
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == cfg.optim.weight_decay
    # lr scales with the global batch: base_lr per 256 (G, not the rank count: G is fixed for a run).
    assert decay["lr"] == pytest.approx(cfg.optim.base_lr * cfg.data.global_batch_size / 256)
    assert build_optimizer(load_config(None, ["model.name=resnet50", "run.num_workers=4"]), model).param_groups[0][
        "lr"] == decay["lr"]


def _checkpoint(directory, step, role, score):
    ckpt.save_state(directory, {"step": step})
    ckpt.write_meta(directory, role=role, step=step, epoch=step // 4, samples=step % 4 * 16, score=score, metric="val_top1")
    ckpt.write_manifest(directory, rank=0, world_size=1)


def _run_folder(root):
    """Checkpoints of both roles beside Ray's own files (names as Ray 2.60 writes them)."""
    for step, role, score in ((2, "recovery", None), (4, "evaluated", 0.5), (8, "evaluated", 0.25),
                              (9, "recovery", None)):
        _checkpoint(root / ckpt.checkpoint_dir_name(step), step, role, score)
    _checkpoint(root / f"{ckpt.checkpoint_dir_name(8)}-1a2b3c", 8, "evaluated", 0.5)  # after a fallback, newer
    (root / "checkpoint_manager_snapshot.json").write_text("{}")
    (root / ".validate_storage_marker").write_text("")
    (root / "checkpoint_tmp_1234").mkdir()  # not of checkpoint_dir_name's form
    (root / "metrics").mkdir()


def test_listing_ignores_rays_files_and_picks_newest_or_best(tmp_path):
    _run_folder(tmp_path)
    names = ckpt.list_checkpoints(str(tmp_path))
    assert names == ["checkpoint_0000000009", "checkpoint_0000000008-1a2b3c", "checkpoint_0000000008",
                     "checkpoint_0000000004", "checkpoint_0000000002"]
    assert ckpt.select_checkpoint(str(tmp_path)) == f"{tmp_path}/checkpoint_0000000009"
    # Highest score; of equal scores the newest (as Ray's retention ranks them).
    assert ckpt.select_checkpoint(str(tmp_path), best=True) == f"{tmp_path}/checkpoint_0000000008-1a2b3c"
    one = f"{tmp_path}/checkpoint_0000000004"
    assert ckpt.select_checkpoint(one) == one and ckpt.select_checkpoint(one + "/", best=True) == one
    assert ckpt.list_checkpoints(str(tmp_path / "nowhere")) == []
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint directory"):
        ckpt.select_checkpoint(str(tmp_path / "metrics"))


def test_best_needs_an_evaluated_checkpoint(tmp_path):
    _checkpoint(tmp_path / ckpt.checkpoint_dir_name(2), 2, "recovery", None)
    with pytest.raises(ckpt.CheckpointError, match="none of its checkpoints .* is an evaluated one"):
        ckpt.select_checkpoint(str(tmp_path), best=True)


def test_listing_on_s3(tmp_path, s3_bucket):
    import fsspec

    _run_folder(tmp_path / "run")
    fsspec.filesystem("s3").put(str(tmp_path / "run") + "/", f"{s3_bucket}/runs/x/", recursive=True)
    url = f"s3://{s3_bucket}/runs/x"
    assert ckpt.select_checkpoint(url) == f"{url}/checkpoint_0000000009"
    assert ckpt.select_checkpoint(url, best=True) == f"{url}/checkpoint_0000000008-1a2b3c"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_in_a_deepspeed_shard_is_refused_before_deepspeed_reads_it(tmp_path):
    from distributed.strategies import DeepSpeedStrategy

    marker = tmp_path / "pwned"
    (tmp_path / "zero").mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "zero" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"state": _Payload(marker)}},
               tmp_path / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ckpt.save_state(tmp_path, {"step": 1})

    class Engine:  # DeepSpeed's engine would unpickle without weights_only; it must never be reached
        calls = 0

        def load_checkpoint(self, *args, **kwargs):
            Engine.calls += 1

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.engine = Engine()
    with pytest.raises(ckpt.CheckpointError, match=r"zero/zero_pp_rank_0_mp_rank_00_optim_states.pt does not load "
                                                   r"with weights_only=True.*could run code"):
        strategy.load(tmp_path)
    assert Engine.calls == 0 and not marker.exists()


def test_the_recovery_score_survives_rays_snapshot():
    """Ray's checkpoint_manager_snapshot.json (pydantic) keeps -1 but turns -inf into null, on which the next
    launch's checkpoint manager fails (seen in a resumed run); so recovery checkpoints score -1."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _TrainingResultState

    from distributed.reporting import RECOVERY_SCORE

    def round_trip(score):
        state = _TrainingResultState(checkpoint_dir_name="checkpoint_0000000002", metrics={"score": score})
        return _TrainingResultState.parse_raw(state.json()).metrics["score"]

    assert round_trip(RECOVERY_SCORE) == RECOVERY_SCORE < 0.0
    assert round_trip(float("-inf")) is None
