"""jobs.export: real checkpoints (DDP, DeepSpeed ZeRO 0-3 in-process) -> safetensors that the upstream torchvision /
timm architecture loads with strict=True, a torch.export program whose logits equal the project's model's, classes
and config; and the README's "Use your model" snippet, run as written against an export made here."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from unittest import mock
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from data import read_index
from data.index import DatasetIndex, write_index
from data.transforms import normalize
from distributed import checkpoint as ckpt
from distributed.loss import compute_loss
from distributed.strategies import build_strategy
from evaluation.checkpoints import build_inference_model
from evaluation.export import inference_weights
from jobs import export as export_job
from models import get_model, list_models
from models.upstream import upstream_for

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3  # the `shards` fixture's classes
SIZE = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tiny_config, shards, tmp_path, name: str, kwargs: dict, *extra: str):
    return tiny_config(shards, str(tmp_path / "runs"), "export", f"model.name={name}",
                       f"model.kwargs={json.dumps(kwargs)}", f"data.image_size={SIZE}", *extra)


def _train_and_save(cfg, directory: Path):
    """One optimizer step with the run's strategy, then its checkpoint, as distributed.loop's reporter writes it."""
    torch.manual_seed(0)
    model = get_model(cfg.model.name, num_classes=NUM_CLASSES, **cfg.model.kwargs)
    strategy = build_strategy(cfg, model, torch.device("cpu"), steps_per_epoch=4)
    strategy.train(True)
    images, labels = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    strategy.step(compute_loss(cfg, strategy.forward(normalize(images)), labels))
    directory.mkdir(parents=True)
    strategy.save(directory, {"config": cfg.to_dict(), "epoch": 0, "samples": 32, "step": 1}, rank=0)
    ckpt.write_manifest(directory, rank=0, world_size=1, writers=strategy.checkpoint_writers)
    return strategy


def _module_weights(strategy) -> dict:
    """The trained fp32 weights as the strategy holds them (ZeRO-3: gathered from their partitions)."""
    if getattr(strategy, "engine", None) is not None and strategy.cfg.strategy.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(strategy.module.parameters())):
            return {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}
    return {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}


def _export(checkpoint: Path, out: Path, *extra: str) -> dict:
    assert export_job.main(["--checkpoint", str(checkpoint), "--out", str(out), *extra]) == 0
    return json.loads((out / "config.json").read_text())


def _check_export(out: Path, expected: dict, cfg) -> torch.Tensor:
    """safetensors = the trained weights (unwrapped fp32); the program's logits = the project's model's."""
    weights = load_file(out / "model.safetensors")
    assert sorted(weights) == sorted(expected)  # same keys (safetensors stores them sorted): no wrapper prefixes
    for k, v in expected.items():
        assert weights[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
        assert torch.equal(weights[k], v.float() if v.is_floating_point() else v), k
    model = build_inference_model(cfg, weights, NUM_CLASSES)
    program = torch.export.load(out / "model.pt2").module()
    x = torch.randn(3, 3, SIZE, SIZE)  # batch 3: the program's batch dimension is dynamic (exported with 2)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(program(x), logits, rtol=1e-4, atol=1e-5)
    classes = json.loads((out / "classes.json").read_text())
    index = read_index(cfg.data.url)
    assert [(c["index"], c["wnid"], c["name"]) for c in classes] == \
        list(zip(range(NUM_CLASSES), index.classes, index.class_names))
    return x


UPSTREAM_CASES = {
    "googlenet": lambda: torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=False),
    "se_googlenet": lambda: torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=False),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=NUM_CLASSES),
    "se_resnet50": lambda: timm.create_model("seresnet50", pretrained=False, num_classes=NUM_CLASSES),
}


@pytest.mark.parametrize("name,kwargs", [("googlenet", {}), ("se_googlenet", {"se_placement": None}),
                                         ("resnet50", {}), ("se_resnet50", {})])
def test_ddp_export_loads_into_the_upstream_architecture(name, kwargs, tiny_config, shards, tmp_path):
    cfg = _config(tiny_config, shards, tmp_path, name, kwargs)
    strategy = _train_and_save(cfg, tmp_path / "runs/export/checkpoint_0000000001")
    config = _export(tmp_path / "runs/export", tmp_path / "out")  # a run folder: its newest checkpoint
    x = _check_export(tmp_path / "out", _module_weights(strategy), cfg)
    upstream = UPSTREAM_CASES[name]()
    upstream.load_state_dict(load_file(tmp_path / "out/model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(upstream.eval()(x), strategy.module.eval()(x))
    assert config["model"] == name and config["num_classes"] == NUM_CLASSES
    assert config["input_size"] == [3, SIZE, SIZE] and config["crop"] == SIZE and config["resize"] == int(SIZE / 0.875)
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]
    assert config["source"]["step"] == 1 and config["source"]["weights"] == "model"
    built = upstream_for(name, NUM_CLASSES, **kwargs).build()  # what config.json's "upstream" names
    assert config["upstream"]["builder"] == {"se_googlenet": "googlenet", "se_resnet50": "seresnet50"}.get(name, name)
    built.load_state_dict(load_file(tmp_path / "out/model.safetensors"), strict=True)


def test_se_googlenet_has_no_upstream_but_a_program(tiny_config, shards, tmp_path):
    cfg = _config(tiny_config, shards, tmp_path, "se_googlenet", {"se_placement": "branch"})
    strategy = _train_and_save(cfg, tmp_path / "ck/checkpoint_0000000001")
    config = _export(tmp_path / "ck/checkpoint_0000000001", tmp_path / "out")
    assert config["upstream"] is None
    _check_export(tmp_path / "out", _module_weights(strategy), cfg)


def test_wrapper_prefixes_and_half_precision_are_undone():
    model = get_model("resnet18", num_classes=NUM_CLASSES)
    plain = model.state_dict()
    wrapped = {f"module._orig_mod.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in plain.items()}
    out = inference_weights(wrapped)
    assert list(out) == list(plain)
    assert all(out[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype) for k, v in plain.items())
    assert torch.equal(out["fc.weight"], plain["fc.weight"].to(torch.bfloat16).float())
    compiled = torch.compile(model)  # torch.compile's own state_dict keys carry `_orig_mod.`
    assert list(inference_weights(compiled.state_dict())) == list(plain)
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}  # not every key wrapped: a real name, kept
    assert list(inference_weights(mixed)) == ["module.a", "b"]


@pytest.mark.parametrize("name", [n for n in list_models() if upstream_for(n) is not None])
def test_every_registered_model_loads_into_its_upstream_strictly(name):
    torch.manual_seed(0)
    ours = get_model(name, num_classes=NUM_CLASSES).eval()
    upstream = upstream_for(name, NUM_CLASSES).build().eval()
    upstream.load_state_dict(inference_weights(ours.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(upstream(x), ours(x))


def test_program_runs_in_plain_pytorch_without_this_repository(tiny_config, shards, tmp_path):
    cfg = _config(tiny_config, shards, tmp_path, "googlenet", {})
    strategy = _train_and_save(cfg, tmp_path / "ck/checkpoint_0000000001")
    _export(tmp_path / "ck/checkpoint_0000000001", tmp_path / "out")
    x = torch.randn(5, 3, SIZE, SIZE)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\n"
              "y = torch.export.load('out/model.pt2').module()(torch.load('x.pt'))\n"
              "torch.save(y, 'y.pt')\n"
              "ours = ('models', 'distributed', 'evaluation', 'torchvision', 'timm')\n"
              "print(sorted(m for m in ours if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # neither this project nor torchvision/timm was imported
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), strategy.module.eval()(x), rtol=1e-4, atol=1e-5)


def test_data_with_another_class_count_is_refused(tiny_config, shards, tmp_path, capsys):
    cfg = _config(tiny_config, shards, tmp_path, "resnet18", {})
    _train_and_save(cfg, tmp_path / "ck/checkpoint_0000000001")
    other = tmp_path / "other-data"
    write_index(str(other), DatasetIndex(classes=[f"n{i:08d}" for i in range(5)], class_names=list("abcde"),
                                         splits={}))
    assert export_job.main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
                            "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "5 classes" in err and "resnet18" in err
    assert not (tmp_path / "out/config.json").exists()


# -- DeepSpeed: real checkpoints of every ZeRO stage, made in this process (world size 1, gloo) ---------------------

@pytest.fixture(scope="module")
def gloo_world_of_one():
    """torch.distributed over gloo with a single rank, as one Ray Train worker of a 1-worker run has it."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with mock.patch.dict(os.environ, env):  # DeepSpeed reads LOCAL_RANK and friends from the environment
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


@pytest.mark.slow  # DeepSpeed's import and engine set-up: 10-60 s on a busy 2-core machine
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_export_every_zero_stage(stage, gloo_world_of_one, tiny_config, shards, tmp_path):
    cfg = _config(tiny_config, shards, tmp_path, "googlenet", {}, "strategy.name=deepspeed",
                  f"strategy.zero_stage={stage}", "strategy.precision=fp32")
    strategy = _train_and_save(cfg, tmp_path / "runs/export/checkpoint_0000000001")
    expected = _module_weights(strategy)
    assert "model" not in torch.load(tmp_path / "runs/export/checkpoint_0000000001/state.pt", weights_only=True)
    config = _export(tmp_path / "runs/export", tmp_path / "out")
    assert config["source"]["weights"] == ("deepspeed module" if stage < 3 else "deepspeed zero_to_fp32")
    _check_export(tmp_path / "out", expected, cfg)
    upstream = torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=False)
    upstream.load_state_dict(load_file(tmp_path / "out/model.safetensors"), strict=True)


# -- README: "Use your model" ------------------------------------------------------------------------------------

def readme_snippets() -> list[str]:
    """The python code blocks of README.md's "Use your model" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use your model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippet_runs_as_written(tiny_config, shards, tmp_path):
    cfg = _config(tiny_config, shards, tmp_path, "googlenet", {})
    _train_and_save(cfg, tmp_path / "ck/checkpoint_0000000001")
    command = next(line for line in (REPO / "README.md").read_text().split("## Use your model", 1)[1].splitlines()
                   if line.startswith("python -m jobs.export"))
    args = command.split()[3:]
    assert args[:2] == ["--checkpoint", "runs/demo"] and "--out" in args and args[args.index("--out") + 1] == "export"
    _export(tmp_path / "ck", tmp_path / "export")  # the command's --out, from this test's run
    raw_val = Path(shards).parent / "raw/ILSVRC/Data/CLS-LOC/val"
    (tmp_path / "photo.jpg").write_bytes(next(iter(sorted(raw_val.glob("*.JPEG")))).read_bytes())
    snippets = readme_snippets()
    assert len(snippets) == 2 and len(snippets[0].strip().splitlines()) <= 10
    proc = subprocess.run([sys.executable, "-I", "-c", "\n".join(snippets)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [c["name"] for c in json.loads((tmp_path / "export/classes.json").read_text())]
    printed = proc.stdout.strip().splitlines()
    assert len(printed) == 2 and all(p in names for p in printed)
    assert printed[0] == printed[1]  # the torchvision model and the exported program agree
