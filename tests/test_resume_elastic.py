"""Resume on any cluster (issue 10), Composer-style on a local Ray: one epoch trained in three attempts of
different shapes (2 ranks started as an elastic range, then 3 ranks with 2 loader workers, then 1 rank in-process)
trains every sample of the epoch exactly once, each global batch the same as an uninterrupted run's, with the lr
of the rule at every step; a resume that would change the order is refused. G = 12: every count of 1-4 divides it.
"""
from __future__ import annotations

import collections
import json
import os

import pytest

from data import TrainLoader
from distributed.loop import stream_options
from distributed.metrics import read_metrics
from distributed.optim import lr_at
from distributed.preflight import PreflightError
from distributed.trainer import fit

pytestmark = pytest.mark.slow

G = 12  # 71 training samples -> 5 steps per epoch, 60 samples


def logged_steps(folder: str) -> dict[int, list[str]]:
    """{step: keys of that global batch, concatenated in rank order} from every rank's sample log."""
    by_step: dict[int, dict[int, list[str]]] = collections.defaultdict(dict)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                r = json.loads(line)
                assert r["epoch"] == 0 and not r["corrupt"]
                assert r["rank"] not in by_step[r["step"]], f"step {r['step']} trained twice by rank {r['rank']}"
                by_step[r["step"]][r["rank"]] = r["keys"]
    return {step: [k for rank in sorted(ranks) for k in ranks[rank]] for step, ranks in by_step.items()}


def test_an_epoch_resumed_at_other_world_sizes_trains_every_sample_once(ray_local, tiny_config, shards, tmp_path):
    storage, log = str(tmp_path / "runs"), str(tmp_path / "samples")
    common = [f"data.global_batch_size={G}", "schedule.epochs=1", "run.log_every_steps=1", f"run.sample_log={log}"]

    def run(*extra: str) -> dict:
        return fit(tiny_config(shards, storage, "elastic", *common, *extra))

    run("run.num_workers=1,2", "data.loader_workers=1", "run.stop_after_steps=2")  # elastic: Ray starts 2 here
    run("run.num_workers=3", "run.cpus_per_worker=0.5", "data.loader_workers=2", "run.stop_after_steps=4")
    summary = run("run.num_workers=1", "data.loader_workers=0")
    assert summary["steps"] == 5 and summary["epochs"] == 1 and summary["world_size"] == 1
    assert [(s["world_size"], s["per_rank_batch"], s["loader_workers"], s["from_step"]) for s in summary["shapes"]] \
        == [(2, 6, 1, 0), (3, 4, 2, 2), (1, 12, 0, 4)]

    cfg = tiny_config(shards, storage, "elastic", *common)
    loader = TrainLoader(stream_options(cfg), 0, 1)  # the uninterrupted epoch, one rank, in-process
    expected = [list(batch["key"]) for batch in loader.epoch(0)]
    got = logged_steps(log)
    assert sorted(got) == list(range(5))  # steps 0-4, each trained once (by every rank of its attempt)
    # Every global batch is the uninterrupted run's, so the epoch's multiset of keys is its sample set exactly.
    assert [got[step] for step in range(5)] == expected
    trained = collections.Counter(k for keys in got.values() for k in keys)
    assert len(trained) == 5 * G and set(trained.values()) == {1}

    # The lr of every step follows the rule: a pure function of the optimizer steps, whatever the shape.
    trains = {r["step"]: r["lr"] for r in read_metrics(os.path.join(storage, "elastic")) if r["kind"] == "train"}
    assert sorted(trains) == [1, 2, 3, 4, 5]
    for step, lr in trains.items():
        assert lr == pytest.approx(lr_at(cfg, step - 1, loader.steps_per_epoch)), step

    with pytest.raises(PreflightError, match="the training order would change mid-epoch.*seed: 0 -> 1"):
        run("run.seed=1", "schedule.epochs=2")
