"""Export a checkpoint to the formats the ecosystem loads: `model.safetensors` (the unwrapped fp32 `state_dict`,
which the upstream torchvision/timm architecture loads with `strict=True`), `config.json` (model, input size,
normalisation, evaluation resize/crop, the upstream builder), `classes.json` (index -> wnid -> name) and
`model.pt2`, a `torch.export` program with a dynamic batch size that a plain PyTorch install runs on normalised
images (`torch.export.load(path).module()(x)`), without this repository, torchvision or timm.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from data import read_index
from data.transforms import EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from distributed.run_folder import RunFolder
from evaluation.checkpoints import CheckpointWeights, build_inference_model
from models.upstream import upstream_for

EXPORT_FORMAT = "imagenet-ray-export/1"
WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE, PROGRAM_FILE = "model.safetensors", "config.json", "classes.json", "model.pt2"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel / DeepSpeed engine, torch.compile
MAX_BATCH = 4096  # the exported program's dynamic batch dimension: 1..MAX_BATCH


@dataclass(frozen=True)
class ExportOptions:
    """What to export besides the checkpoint: the data index for the class names, and the input size."""

    data_url: str  # the shards whose index names the classes (default: the run's data.url)
    image_size: int  # the program's input size (default: the run's data.image_size)
    check_batch: int = 2  # images of the self-check: the program's logits against the model's


def inference_weights(weights: dict) -> OrderedDict:
    """The state_dict unwrapped (no `module.` / `_orig_mod.` prefixes, however nested) and in fp32."""
    state = OrderedDict(weights)
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        consume_prefix_in_state_dict_if_present(state, prefix)
    return OrderedDict((k, (v.float() if v.is_floating_point() else v).contiguous()) for k, v in state.items())


def class_table(data_url: str) -> list[dict]:
    """[{"index", "wnid", "name"}] in class-index order, from the data index the run trained on."""
    index = read_index(data_url)
    return [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(index.classes, index.class_names))]


def export_config(ck: CheckpointWeights, options: ExportOptions, num_classes: int) -> dict:
    """config.json: everything needed to rebuild the model and feed it as training's evaluation did."""
    kwargs = {k: v for k, v in ck.cfg.model.kwargs.items() if k != "num_classes"}  # the index's count wins
    upstream = upstream_for(ck.cfg.model.name, num_classes, **kwargs)
    size = options.image_size
    return {
        "format": EXPORT_FORMAT,
        "model": ck.cfg.model.name,
        "model_kwargs": {**kwargs, "num_classes": num_classes},
        "num_classes": num_classes,
        "upstream": None if upstream is None else {"library": upstream.library, "builder": upstream.builder,
                                                   "kwargs": upstream.kwargs, "code": upstream.code()},
        "input_size": [3, size, size],  # NCHW, RGB, float32
        "mean": list(IMAGENET_MEAN),  # on images scaled to [0, 1]
        "std": list(IMAGENET_STD),
        "resize": int(size / EVAL_CROP_RATIO),  # shorter side, bilinear with antialias, then a centre crop
        "crop": size,
        "interpolation": "bilinear",
        "output": f"logits [N, {num_classes}]; index i is classes.json[i]",
        "files": {"weights": WEIGHTS_FILE, "program": PROGRAM_FILE, "classes": CLASSES_FILE},
        "source": {"checkpoint": ck.url, "weights": ck.source, "step": ck.step, "epoch": ck.epoch,
                   "data": options.data_url},
        "torch": torch.__version__,
    }


def export_program(model: nn.Module, image_size: int, check_batch: int) -> torch.export.ExportedProgram:
    """`torch.export` of the eval-mode model with a dynamic batch; raises if its logits differ from the model's."""
    x = torch.randn(max(2, check_batch), 3, image_size, image_size)  # batch 1 would be specialised as a constant
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        want, got = model(x), program.module()(x)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the exported program's logits differ from the model's by {(got - want).abs().max():.3g}")
    return program


def write_export(ck: CheckpointWeights, options: ExportOptions, out: str) -> dict:
    """Write the four files into `out` (any fsspec URL), each atomically, config.json last. Returns config.json."""
    weights = inference_weights(ck.weights)
    classes = class_table(options.data_url)
    num_classes = len(classes)
    model = build_inference_model(ck.cfg, weights, num_classes)  # strict; a class count that differs is named
    config = export_config(ck, options, num_classes)
    folder = RunFolder(out)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        save_file(dict(weights), os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt", "export": EXPORT_FORMAT})
        program = export_program(model, options.image_size, options.check_batch)
        torch.export.save(program, os.path.join(tmp, PROGRAM_FILE))
        for name, doc in ((CLASSES_FILE, classes), (CONFIG_FILE, config)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(doc, f, indent=1)
        for name in (WEIGHTS_FILE, PROGRAM_FILE, CLASSES_FILE, CONFIG_FILE):
            folder.put_file(os.path.join(tmp, name), name)
    return config

