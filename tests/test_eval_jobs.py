"""jobs.evaluate / jobs.predict / jobs.report and the evaluation package on a tiny prepared sample dataset.

Checkpoints are written directly in the checkpoint format (no training); figures are checked against direct
computations from the raw sample files, and the box geometry and scoring as units.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from data.prepare import prepare_dataset
from data.sample import make_sample
from data.transforms import normalize
from distributed import checkpoint as ckpt
from distributed.config import dump_yaml, load_config
from evaluation import checkpoints, localize, report
from evaluation import predict as prediction
from jobs import evaluate as evaluate_job
from jobs import export as export_job
from jobs import predict as predict_job
from jobs import report as report_job
from models import get_model

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
IMAGE_SIZE = 64  # 2x2 last feature map in GoogLeNet: small, but CAMs still vary across the image
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 classes, 4 val images each, 5 test images, shards of 5 (several per split). Prepared serially, no Ray."""
    root = tmp_path_factory.mktemp("data")
    make_sample(str(root / "raw"), classes=NUM_CLASSES, per_class=4, val_per_class=4, test=5, seed=0)
    prepare_dataset(str(root / "raw"), str(root / "shards"), shard_size=5, log=lambda _: None)
    return root


def _config(dataset, *overrides):
    return load_config(str(REPO / "configs/demo.yaml"),
                       [f"data.url={dataset / 'shards'}", f"data.image_size={IMAGE_SIZE}", *overrides])


def _model(name="se_googlenet", kwargs=None, seed=0):
    """A model whose predictions differ between images: a wide random classifier over the features."""
    torch.manual_seed(seed)
    model = get_model(name, num_classes=NUM_CLASSES, **(kwargs if kwargs is not None else {"se_placement": "branch"}))
    torch.nn.init.normal_(model.fc.weight, std=2.0)
    return model.eval()


def _save(directory: Path, model, cfg, step: int) -> Path:
    ckpt.save_state(directory, {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "step": step,
                                "best_top1": 0.0})
    ckpt.write_manifest(directory, rank=0, world_size=1)
    return directory


@pytest.fixture(scope="module")
def run(dataset):
    """A run folder with two checkpoints (steps 3 and 7); the newest holds `_model()`."""
    folder = dataset / "runs" / "demo"
    cfg = _config(dataset)
    _save(folder / ckpt.checkpoint_dir_name(3), _model(seed=1), cfg, 3)
    _save(folder / ckpt.checkpoint_dir_name(7), _model(), cfg, 7)
    return folder


def _val_truth(dataset) -> dict[str, tuple[int, list]]:
    """key -> (class index, [(class, box)]) from the raw layout's LOC files, independent of the shards."""
    wnids = [line.split()[0] for line in (dataset / "raw/LOC_synset_mapping.txt").read_text().splitlines()]
    out = {}
    with open(dataset / "raw/LOC_val_solution.csv") as f:
        for row in csv.DictReader(f):
            parts = row["PredictionString"].split()
            boxes = [(wnids.index(parts[i]), tuple(int(float(v)) for v in parts[i + 1:i + 5]))
                     for i in range(0, len(parts), 5)]
            out[row["ImageId"]] = (boxes[0][0], boxes)
    return out


def _raw_image(dataset, split: str, key: str) -> torch.Tensor:
    return decode_image(str(dataset / f"raw/ILSVRC/Data/CLS-LOC/{split}/{key}.JPEG"), mode=ImageReadMode.RGB)


# -- jobs.evaluate ------------------------------------------------------------------------------------------------

def test_evaluate_matches_direct_computation(dataset, run, tmp_path):
    size = 32  # 10 crops per image: small crops keep the test short
    assert evaluate_job.main(["--checkpoint", str(run), "--ten-crop", "--batch-size", "5", "--image-size", str(size),
                              "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["checkpoint"].endswith(ckpt.checkpoint_dir_name(7)) and results["step"] == 7  # newest picked

    model, truth = _model(), _val_truth(dataset)
    resize, ten = v2.Resize(int(size / 0.875), antialias=True), v2.TenCrop(size)
    hits = {"centre": [0, 0], "ten_crop": [0, 0]}
    per_class = np.zeros((NUM_CLASSES, 2), dtype=int)  # centre: samples, top-1 hits
    with torch.no_grad():
        for key, (label, _) in truth.items():
            crops = torch.stack(ten(resize(_raw_image(dataset, "val", key))))
            probs = model(normalize(crops)).softmax(1)
            for name, p in (("centre", probs[4]), ("ten_crop", probs.mean(0))):
                top = p.topk(min(5, NUM_CLASSES)).indices.tolist()
                hits[name][0] += top[0] == label
                hits[name][1] += label in top
            per_class[label] += (1, probs[4].argmax().item() == label)
    n = len(truth)
    for name in ("centre", "ten_crop"):
        assert results[name]["samples"] == n
        assert results[name]["top1"] == pytest.approx(hits[name][0] / n)
        assert results[name]["top5"] == pytest.approx(hits[name][1] / n)
    assert [[c["samples"], round(c["top1"] * c["samples"])] for c in results["centre"]["per_class"]] == \
        per_class.tolist()
    assert 0 < results["centre"]["top1"] < 1  # the model is not constant: the check above means something
    pairs = results["centre"]["confused_pairs"]
    assert pairs and all(p["true"] != p["predicted"] for p in pairs)
    assert sum(p["count"] for p in pairs) == n - hits["centre"][0]  # 3 classes: every confusion is listed

    md = (tmp_path / "results.md").read_text()
    for name in ("AlexNet", "GoogLeNet", "ResNet-50", "SE-ResNet-50", "SENet-154", "arXiv:1709.01507", "10-crop"):
        assert name in md


@pytest.mark.parametrize("job,required", [(evaluate_job, []), (predict_job, ["--split", "val", "--out", "s.csv"]),
                                          (export_job, ["--out", "export"])])
def test_every_checkpoint_job_chooses_the_checkpoint_the_same_way(job, required):
    """--checkpoint, --best and --weights/--ema parse alike in every job that reads a checkpoint."""
    base = ["--checkpoint", "runs/demo", *required]
    assert (job.parse_args(base).weights, job.parse_args(base).best) == ("scored", False)
    for choice in checkpoints.WEIGHTS:
        assert job.parse_args([*base, "--weights", choice, "--best"]).weights == choice
    assert job.parse_args([*base, "--ema"]).weights == "ema"
    with pytest.raises(SystemExit):
        job.parse_args([*base, "--weights", "model"])


def test_evaluate_default_out_is_the_run_folder_and_bad_checkpoint_fails(run, tmp_path):
    ck = checkpoints.read_checkpoint(str(run / ckpt.checkpoint_dir_name(3)))
    assert ck.step == 3 and ck.source == "model" and report.default_results_dir(ck.url) == str(run)
    broken = tmp_path / "checkpoint_0000000009"
    shutil.copytree(run / ckpt.checkpoint_dir_name(7), broken)
    with open(broken / "state.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    assert evaluate_job.main(["--checkpoint", str(broken)]) == 2  # the manifest's sha256 catches it


def test_checkpoint_from_s3(run, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(run / ckpt.checkpoint_dir_name(7)) + "/", f"{s3_bucket}/runs/demo/{ckpt.checkpoint_dir_name(7)}/",
           recursive=True)
    ck = checkpoints.read_checkpoint(f"s3://{s3_bucket}/runs/demo")  # a run folder: its newest checkpoint
    assert ck.url == f"s3://{s3_bucket}/runs/demo/{ckpt.checkpoint_dir_name(7)}" and ck.step == 7
    expected = _model().state_dict()
    assert all(torch.equal(expected[k], v) for k, v in ck.weights.items()) and ck.weights.keys() == expected.keys()
    assert report.default_results_dir(ck.url) == os.getcwd()


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    sys.path.insert(0, {repo!r})
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from distributed import checkpoint as ckpt
    from distributed.config import load_config
    from distributed.strategies import DeepSpeedStrategy
    from models import get_model
    for stage, out in ((0, {out0!r}), (1, {out1!r})):  # bf16 autocast; stage 0 writes no optimizer shards
        cfg = load_config({config!r}, {overrides!r} + [f"strategy.zero_stage={{stage}}"])
        torch.manual_seed(0)
        model = get_model("googlenet", num_classes=3)
        strategy = DeepSpeedStrategy(cfg, model, torch.device("cpu"), steps_per_epoch=1)
        torch.save(model.state_dict(), os.path.join({tmp!r}, f"expected{{stage}}.pt"))
        strategy.save(out, {{"config": cfg.to_dict(), "epoch": 0, "step": 1}}, rank=0)
        ckpt.write_manifest(out, rank=0, world_size=1, writers=1)
""")


@pytest.mark.slow  # DeepSpeed's import and two engines: about 18 s
def test_deepspeed_checkpoints_load_and_a_planted_payload_is_refused(dataset, tmp_path):
    """Stage 0 and 1 with bf16 autocast: fp32 weights from the module states; a pickle payload planted in a ZeRO
    shard is refused before anything unpickles it (the payload would create a marker file)."""
    out0, out1 = tmp_path / "checkpoint_0000000001", tmp_path / "stage1" / "checkpoint_0000000001"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"data.url={dataset / 'shards'}", f"data.image_size={IMAGE_SIZE}", "model.name=googlenet",
                 "model.kwargs={}", "strategy.name=deepspeed", "strategy.precision=bf16"]
    script = DEEPSPEED_SCRIPT.format(repo=str(REPO), port=port, config=str(REPO / "configs/demo.yaml"),
                                     overrides=overrides, out0=str(out0), out1=str(out1), tmp=str(tmp_path))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",  # DeepSpeed asserts LOCAL_RANK
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, timeout=300, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((out0 / "zero").glob("*optim_states.pt")) and list((out1 / "zero").glob("*optim_states.pt"))
    for stage, out in ((0, out0), (1, out1)):
        want = torch.load(tmp_path / f"expected{stage}.pt", weights_only=True)
        assert "model" not in torch.load(out / "state.pt", weights_only=True)
        ck = checkpoints.read_checkpoint(str(out))
        assert ck.source == "deepspeed module" and ck.cfg.strategy.zero_stage == stage
        assert ck.weights.keys() == want.keys()
        assert all(torch.equal(want[k], ck.weights[k]) and ck.weights[k].dtype == want[k].dtype for k in want)
        checkpoints.build_inference_model(ck.cfg, ck.weights, NUM_CLASSES)  # strict: every key fits
    rebuilt, source = checkpoints.deepspeed_weights(out1, zero_stage=3)  # the zero_to_fp32 path (ZeRO-3's)
    assert source == "deepspeed zero_to_fp32"
    want = torch.load(tmp_path / "expected1.pt", weights_only=True)
    assert all(torch.equal(want[k], rebuilt[k]) for k in rebuilt)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shard = next((out1 / "zero").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload()}, shard)
    ckpt.write_manifest(out1, rank=0, world_size=1, writers=1)  # a consistent manifest: only the payload is wrong
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard.name} does not load with weights_only=True.*could run "
                                                   "code"):
        checkpoints.read_checkpoint(str(out1))
    with pytest.raises(ckpt.CheckpointError, match="does not load with weights_only=True"):
        checkpoints.deepspeed_weights(out1, zero_stage=3)
    assert evaluate_job.main(["--checkpoint", str(out1)]) == 2
    assert not marker.exists()


# -- jobs.predict -------------------------------------------------------------------------------------------------

def _read_submission(path: Path) -> list[tuple[str, list[list[str]]]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    out = []
    for key, text in rows[1:]:
        parts = text.split()
        assert len(parts) % 5 == 0 and 0 < len(parts) // 5 <= 5
        out.append((key, [parts[i:i + 5] for i in range(0, len(parts), 5)]))
    return out


def test_predict_test_split_id_labels(dataset, run, tmp_path):
    out = tmp_path / "submission.csv"
    assert predict_job.main(["--checkpoint", str(run), "--split", "test", "--out", str(out), "--batch-size", "2"]) == 0
    rows = _read_submission(out)
    keys = sorted(p.stem for p in (dataset / "raw/ILSVRC/Data/CLS-LOC/test").iterdir())
    assert [k for k, _ in rows] == keys
    for key, guesses in rows:
        width, height = Image.open(dataset / f"raw/ILSVRC/Data/CLS-LOC/test/{key}.JPEG").size
        assert len({g[0] for g in guesses}) == len(guesses)
        for label, *box in guesses:
            assert 1 <= int(label) <= NUM_CLASSES
            x0, y0, x1, y1 = map(int, box)
            assert 0 <= x0 <= x1 <= width - 1 and 0 <= y0 <= y1 <= height - 1
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["kind"] == "predict" and summary["localization"] is None and summary["images"] == len(keys)


def test_predict_val_localization_error(dataset, run, tmp_path):
    out = tmp_path / "val.csv"
    assert predict_job.main(["--checkpoint", str(run), "--split", "val", "--out", str(out),
                             "--label-format", "wnid"]) == 0
    wnids = [line.split()[0] for line in (dataset / "raw/LOC_synset_mapping.txt").read_text().splitlines()]
    truth = _val_truth(dataset)
    wrong = 0
    for key, guesses in _read_submission(out):
        label, boxes = truth[key]
        assert all(g[0] in wnids for g in guesses)
        ok = any(wnids.index(g[0]) == label and
                 any(c == label and localize.box_iou(tuple(map(int, g[1:])), b) >= 0.5 for c, b in boxes)
                 for g in guesses)
        wrong += not ok
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["localization"]["images"] == len(truth)
    assert summary["localization"]["top5_localization_error"] == wrong / len(truth)
    assert "class activation maps" in summary["boxes"]


@pytest.mark.slow
def test_predict_over_ray_tasks_matches_in_process(dataset, run, ray_local, monkeypatch):
    ck = checkpoints.read_checkpoint(str(run))
    kw = dict(batch_size=2, image_size=IMAGE_SIZE)
    monkeypatch.chdir(dataset)  # a relative data URL must reach the Ray workers as an absolute one
    local = prediction.run_predictions(ck, "shards", "test", tasks=1, **kw)
    spread = prediction.run_predictions(ck, "shards", "test", tasks=2, **kw)
    assert [r["key"] for r in spread] == [r["key"] for r in local]
    for a, b in zip(local, spread):
        assert a["classes"] == b["classes"] and a["boxes"] == b["boxes"]


# -- jobs.report --------------------------------------------------------------------------------------------------

def test_report_writes_page_and_chart(dataset, tmp_path):
    a, b = tmp_path / "runs/se_googlenet", tmp_path / "runs/googlenet"
    for folder, top1 in ((a, 0.6), (b, 0.4)):
        folder.mkdir(parents=True)
        records = [{"kind": "train", "step": s, "loss": 1.1 - s / 100, "lr": 0.1, "images_per_s": 50.0}
                   for s in range(1, 30, 5)]
        records += [{"kind": "eval", "epoch": e, "step": 10 * e, "val_top1": top1 * e / 3, "val_top5": 1.0,
                     "val_loss": 1.0, "val_samples": 12} for e in (1, 2, 3)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (a / "summary.json").write_text(json.dumps({"model": "se_googlenet", "strategy": "ddp", "world_size": 2,
                                                "epochs": 3, "best_top1": 0.6, "best_top5": 1.0}))
    (a / "results.json").write_text(json.dumps({"kind": "evaluate", "model": "se_googlenet",
                                                "centre": {"top1": 0.5, "top5": 0.9}, "ten_crop": None}))
    (b / "config.yaml").write_text(dump_yaml(load_config(None, ["model.name=googlenet", "run.num_workers=4"])))
    (a / "val.json").write_text(json.dumps({"kind": "predict", "localization": {"top5_localization_error": 0.25}}))
    out = tmp_path / "report"
    assert report_job.main([str(a), str(b), "--out", str(out)]) == 0
    page = (out / "report.md").read_text()
    row_a = next(line for line in page.splitlines() if line.startswith("| se_googlenet |"))
    assert "60.00" in row_a and "50.00" in row_a and "25.00" in row_a and "centre crop" in row_a
    row_b = next(line for line in page.splitlines() if line.startswith("| googlenet |"))
    assert "40.00" in row_b and "| googlenet | ddp | 4 |" in row_b  # no summary.json: metrics.jsonl, config.yaml
    for text in ("2012", "SuperVision", "2017", "SENet", "image-net.org", "SENet-154", "report.png"):
        assert text in page
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
