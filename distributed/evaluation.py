"""Inference from a training checkpoint: loading, top-1/top-5 evaluation, class-activation-map boxes for the Kaggle
localization submission, and the tables and chart that set results beside the published figures.

- Evaluation follows the torchvision reference protocol: resize the shorter side to image_size / 0.875, one centre
  crop; optionally the ten crops of `TenCrop` (four corners and centre, and the same on the mirrored image) with
  their softmax averaged (Krizhevsky et al. 2012, sec. 4.1). The centre crop is the fifth of the ten, so one pass
  gives both.
- Boxes are class activation maps (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR
  2016): for a network that ends in global average pooling and one Linear, CAM_c = sum_k w_ck f_k(x, y) over the
  last convolutional feature map. The map is upsampled to the crop, min-max normalised, thresholded at 20 % and
  the largest connected component (8-connectivity) is boxed, then mapped back through the crop and the resize.
- Localization error is ILSVRC's: an image counts as correct when one of its (up to) five guesses has the true
  class and IoU >= 0.5 with a ground-truth box of that class. Boxes are inclusive pixel coordinates, IoU with
  the +1 widths of the PASCAL VOC / ILSVRC devkits.

Used by `jobs.evaluate`, `jobs.predict` and `jobs.report`.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from fsspec.implementations.local import LocalFileSystem
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from data import ShardStream, build_loader, normalize, read_index
from data.decode import CorruptImageError, decode_rgb
from data.shards import ShardFormatError
from data.stream import pieces_of, rank_range, read_piece
from data.transforms import EVAL_CROP_RATIO, eval_transform
from distributed.checkpoint import CheckpointError, load_state
from distributed.config import Config, config_from_dict
from distributed.run_folder import RunFolder, join, storage_uri
from distributed.strategies import DeepSpeedStrategy
from models import ILSVRC_WINNERS, get_model, split_outputs, unwrap_model
from models.published import published_for

TOP_K = 5  # guesses per image in the Kaggle submission and in top-5 accuracy
CENTRE_OF_TEN = 4  # TenCrop order: top-left, top-right, bottom-left, bottom-right, centre, then mirrored
CAM_THRESHOLD = 0.2  # Zhou et al. 2016, sec. 3: "above 20% of the max value of the CAM"
IOU_THRESHOLD = 0.5  # ILSVRC localization criterion
# The single-model baselines every evaluation is printed beside (figures and sources: models/published.py).
REFERENCE_MODELS = ("alexnet", "googlenet", "resnet50", "se_resnet50", "senet154")
DISPLAY_NAMES = {"alexnet": "AlexNet", "googlenet": "GoogLeNet", "resnet50": "ResNet-50",
                 "se_resnet50": "SE-ResNet-50", "senet154": "SENet-154", "se_googlenet": "SE-GoogLeNet",
                 "se_bn_inception": "SE-BN-Inception"}
PREDICT_KIND = "predict"  # the "kind" of predict's JSON sidecar, which jobs.report looks for
EVALUATE_KIND = "evaluate"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


# -- checkpoints ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointWeights:
    """What inference needs from a checkpoint: the run config and the model's unwrapped fp32 state_dict."""

    url: str  # the checkpoint directory
    cfg: Config
    weights: dict
    source: str  # which weights: "model", "ema", "deepspeed module", "deepspeed zero_to_fp32"
    step: int
    epoch: int


def find_checkpoint(url: str) -> str:
    """`url` when it is a checkpoint directory; for a run folder, its newest `checkpoint_*` directory."""
    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    if fs.exists(f"{path}/manifest.rank0.json"):
        return url
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise CheckpointError(f"{url}: does not exist") from None
    names = [n for n in names if n.startswith("checkpoint_")]
    if not names:
        raise CheckpointError(f"{url}: neither a checkpoint directory (no manifest.rank0.json) nor a run folder "
                              "holding checkpoint_* directories")
    return join(url, names[-1])  # checkpoint_<step:010d> sorts by step


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local directory with the checkpoint's files: the directory itself when local, else a temporary download."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    local = tempfile.mkdtemp(prefix="checkpoint-")
    try:
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def deepspeed_weights(directory: str | Path, zero_stage: int, precision: str) -> tuple[dict, str]:
    """The fp32 model weights of a DeepSpeed checkpoint (tag `zero`, as DeepSpeedStrategy saves it)."""
    tag_dir = Path(directory) / DeepSpeedStrategy.TAG
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {directory}: no DeepSpeed '{DeepSpeedStrategy.TAG}/' directory")
    if zero_stage < 3 and precision == "fp32":
        # Stages 0-2 keep whole fp32 parameters in the module states; this file loads with weights_only=True.
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return dict(states["module"]), "deepspeed module"
    # ZeRO-3 partitions the parameters and bf16/fp16 runs keep only half-precision ones in the module states:
    # rebuild the fp32 master weights from the optimizer shards. DeepSpeed's loader is not weights_only (it
    # unpickles whatever the files hold): load such checkpoints only from storage you trust.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DeepSpeedStrategy.TAG)
    return dict(weights), "deepspeed zero_to_fp32"


def select_weights(directory: str, cfg: Config, state: dict, ema: bool) -> tuple[dict, str]:
    """(state_dict, which weights): the EMA or model entry of state.pt, else the DeepSpeed files."""
    if ema:
        if not state.get("ema"):
            raise CheckpointError(f"checkpoint {directory}: no EMA weights (the run had optim.ema_decay unset)")
        return state["ema"], "ema"
    if state.get("model") is not None:
        return state["model"], "model"
    if cfg.strategy.name == "deepspeed":
        return deepspeed_weights(directory, cfg.strategy.zero_stage, cfg.strategy.precision)
    raise CheckpointError(f"checkpoint {directory}: state.pt has no 'model' weights and the run's strategy is "
                          f"{cfg.strategy.name!r}, not 'deepspeed'")


def read_checkpoint(url: str, ema: bool = False) -> CheckpointWeights:
    """Download (when remote), verify the manifests and read config and weights of a DDP or DeepSpeed checkpoint."""
    url = find_checkpoint(url)
    with local_copy(url) as directory:
        state = load_state(directory)  # checks every manifest first; torch.load(weights_only=True)
        if "config" not in state:
            raise CheckpointError(f"checkpoint {url}: state.pt has no 'config'")
        cfg = config_from_dict(state["config"])
        weights, source = select_weights(directory, cfg, state, ema)
    return CheckpointWeights(url, cfg, weights, source, int(state.get("step", 0)), int(state.get("epoch", 0)))


def build_inference_model(cfg: Config, weights: dict, num_classes: int) -> nn.Module:
    """The run's model with its weights loaded strictly, in eval mode on the CPU."""
    model = get_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit {cfg.model.name} with {num_classes} classes "
                              f"(the dataset's class count); {str(e).splitlines()[0]}") from None
    return model.eval()


# -- evaluation: centre crop and 10-crop --------------------------------------------------------------------------

def _ten_crop(resize, crop, image: torch.Tensor) -> torch.Tensor:
    return torch.stack(crop(resize(image)))


def ten_crop_transform(image_size: int):
    """The eval preset's resize, then TenCrop: uint8 [3, H, W] -> [10, 3, S, S]; crop 4 equals the eval preset."""
    resize = v2.Resize(int(image_size / EVAL_CROP_RATIO), antialias=True)
    return functools.partial(_ten_crop, resize, v2.TenCrop(image_size))


def eval_loader(url: str, split: str, *, image_size: int, batch_size: int, num_workers: int, ten_crop: bool):
    """One process's loader over a whole split; 10-crop batches are uint8 [b, 10, 3, S, S]."""
    if not ten_crop:
        return build_loader(url, split, batch_size=batch_size, rank=0, world_size=1, train=False,
                            image_size=image_size, num_workers=num_workers, seed=0, epoch=0)
    stream = ShardStream(url, split, batch_size=batch_size, train=False, transform=ten_crop_transform(image_size),
                         image_size=image_size, num_workers=num_workers)
    return DataLoader(stream, batch_size=None, num_workers=num_workers)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def crop_probabilities(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax of the centre crop, and the 10-crop average when `images` holds ten crops per image (on the CPU)."""
    device = next(model.parameters()).device
    if images.dim() == 4:
        return split_outputs(model(normalize(images, device)))[0].float().softmax(1).cpu(), None
    b, n = images.shape[:2]
    probs = split_outputs(model(normalize(images.flatten(0, 1), device)))[0].float().softmax(1).view(b, n, -1).cpu()
    return probs[:, CENTRE_OF_TEN], probs.mean(1)


class Tally:
    """Exact counts for one protocol: a confusion matrix of top-1 guesses, top-5 hits and the summed loss."""

    def __init__(self, num_classes: int):
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: true, cols: top-1
        self.top5 = torch.zeros(num_classes, dtype=torch.int64)
        self.loss = 0.0

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1).indices
        flat = labels * self.confusion.shape[1] + top[:, 0]
        self.confusion += torch.bincount(flat, minlength=self.confusion.numel()).view_as(self.confusion)
        self.top5 += torch.bincount(labels[top.eq(labels[:, None]).any(1)], minlength=len(self.top5))
        self.loss -= probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum().item()

    def summary(self, classes: list[str], names: list[str], pairs: int = 10) -> dict:
        per_true, hits1, hits5 = self.confusion.sum(1).tolist(), self.confusion.diag().tolist(), self.top5.tolist()
        n = sum(per_true)
        per_class = [{"class": c, "wnid": classes[c], "name": names[c], "samples": per_true[c],
                      "top1": hits1[c] / per_true[c] if per_true[c] else None,
                      "top5": hits5[c] / per_true[c] if per_true[c] else None}
                     for c in range(len(classes))]
        return {"samples": n, "top1": sum(hits1) / n, "top5": sum(hits5) / n,
                "loss": self.loss / n, "per_class": per_class,
                "confused_pairs": confused_pairs(self.confusion, classes, names, pairs)}


def confused_pairs(confusion: torch.Tensor, classes: list[str], names: list[str], k: int) -> list[dict]:
    """The k largest off-diagonal cells: (true class, top-1 guess, count, share of the true class's images)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    out = []
    for count, index in zip(counts.tolist(), flat.tolist()):
        if count == 0:
            break
        t, p = divmod(index, confusion.shape[1])
        out.append({"true": classes[t], "true_name": names[t], "predicted": classes[p], "predicted_name": names[p],
                    "count": count, "share": count / int(confusion[t].sum())})
    return out


def evaluate_model(model: nn.Module, loader, num_classes: int) -> dict:
    """Run a loader through the model; returns {"centre": Tally, "ten_crop": Tally | None, "corrupt": keys}."""
    centre, ten, corrupt = Tally(num_classes), None, []
    for batch in loader:
        corrupt += batch["corrupt"]
        if len(batch["label"]) == 0:
            continue
        labels = batch["label"]
        if (labels < 0).any():
            raise ValueError("the split has unlabelled samples (label -1): evaluate the val split, not test")
        p_centre, p_ten = crop_probabilities(model, batch["image"])
        centre.add(p_centre, labels)
        if p_ten is not None:
            ten = ten or Tally(num_classes)
            ten.add(p_ten, labels)
    if centre.confusion.sum() == 0:
        raise ValueError("evaluation saw no decodable images")
    return {"centre": centre, "ten_crop": ten, "corrupt": corrupt}


def evaluate_checkpoint(ck: CheckpointWeights, data_url: str, split: str = "val", *, image_size: int,
                        batch_size: int, num_workers: int = 0, ten_crop: bool = False,
                        device: torch.device | None = None) -> dict:
    """The results document of jobs.evaluate: both protocols' figures, per class, confused pairs, provenance."""
    index = read_index(data_url)
    model = build_inference_model(ck.cfg, ck.weights, index.num_classes).to(device or default_device())
    loader = eval_loader(data_url, split, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         ten_crop=ten_crop)
    out = evaluate_model(model, loader, index.num_classes)
    seen, expected = int(out["centre"].confusion.sum()) + len(out["corrupt"]), index.split(split, data_url).samples
    if seen != expected:  # never report a figure over a silently different set of images
        raise RuntimeError(f"{data_url} split {split!r}: evaluated {seen} samples, index.json lists {expected}")
    return {"kind": EVALUATE_KIND, "checkpoint": ck.url, "model": ck.cfg.model.name,
            "model_kwargs": ck.cfg.model.kwargs, "weights": ck.source, "step": ck.step, "epoch": ck.epoch,
            "data": data_url, "split": split, "image_size": image_size, "corrupt": out["corrupt"],
            "centre": out["centre"].summary(index.classes, index.class_names),
            "ten_crop": out["ten_crop"].summary(index.classes, index.class_names) if out["ten_crop"] else None,
            "published": published_rows()}


# -- class activation maps and boxes ---------------------------------------------------------------------------

# The layer whose output is the last convolutional feature map, right before global average pooling.
_CAM_LAYERS = {"GoogLeNet": "inception5b", "ResNet": "layer4"}  # torchvision classes


def cam_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(feature source, classifier) for CAM: "forward_features" (timm) or a layer name; None without a GAP head."""
    inner = unwrap_model(model)
    if hasattr(inner, "forward_features") and hasattr(inner, "forward_head"):
        head = inner.get_classifier()
        return ("forward_features", head) if isinstance(head, nn.Linear) else None
    layer = _CAM_LAYERS.get(type(inner).__name__)
    if layer is None or not isinstance(getattr(inner, "fc", None), nn.Linear):
        return None  # e.g. AlexNet: 6x6 pooling and three fully connected layers, no CAM
    return layer, inner.fc


def model_has_cam(cfg: Config) -> bool:
    """Whether the run's architecture has a CAM head (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        return cam_head(get_model(cfg.model.name, num_classes=2, **cfg.model.kwargs)) is not None


@torch.no_grad()
def cam_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, last conv feature map [b, K, h, w] or None when the model has no CAM head)."""
    inner, head = unwrap_model(model), cam_head(model)
    if head is None:
        return split_outputs(model(images))[0], None
    if head[0] == "forward_features":
        features = inner.forward_features(images)
        return inner.forward_head(features), features
    captured: list[torch.Tensor] = []
    hook = getattr(inner, head[0]).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = split_outputs(model(images))[0]
    finally:
        hook.remove()
    return logits, captured[-1]


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM_c(x, y) = sum_k w_ck f_k(x, y) for the classes [b, k] of each image: [b, k, h, w]."""
    return torch.einsum("bjk,bkhw->bjhw", weight[classes].float(), features.float())


def largest_component_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), inclusive, of the largest 8-connected True region; None when the mask is empty.

    Labels runs of True pixels row by row and unions overlapping runs of adjacent rows (union-find), so the
    cost grows with the number of runs, not pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # exclusive; row-major order pairs each start with its end
    if len(rows) == 0:
        return None
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row r: first[r] .. first[r + 1]
    for r in range(1, h):
        i, j = first[r - 1], first[r]
        while i < first[r] and j < first[r + 1]:
            if starts[i] <= ends[j] and starts[j] <= ends[i]:  # touching, diagonals included
                parent[find(i)] = find(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    best: dict[int, list[int]] = {}
    for n in range(len(rows)):
        root, r, s, e = find(n), int(rows[n]), int(starts[n]), int(ends[n]) - 1
        a = best.setdefault(root, [0, s, r, e, r])
        a[0] += e - s + 1
        a[1], a[2], a[3], a[4] = min(a[1], s), min(a[2], r), max(a[3], e), max(a[4], r)
    _, x0, y0, x1, y1 = max(best.values(), key=lambda a: a[0])
    return x0, y0, x1, y1


def cam_box(cam: torch.Tensor, size: int, threshold: float = CAM_THRESHOLD) -> tuple[int, int, int, int]:
    """Box (inclusive crop pixels) of the largest region above `threshold` of a [h, w] CAM upsampled to size x size.

    A constant map (e.g. a 1x1 feature map at small image sizes) carries no location: the box is the whole crop.
    """
    up = F.interpolate(cam[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    if not torch.isfinite(hi - lo) or hi - lo <= 0:
        return 0, 0, size - 1, size - 1
    box = largest_component_box(((up - lo) / (hi - lo) >= threshold).numpy())
    assert box is not None  # the maximum itself is above any threshold <= 1
    return box


@dataclass(frozen=True)
class EvalGeometry:
    """Where the eval preset's crop lies: original size, size after the shorter-side resize, crop offset."""

    width: int
    height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    size: int


def eval_geometry(width: int, height: int, image_size: int) -> EvalGeometry:
    """The geometry of `data.transforms.eval_transform` for a width x height image (torchvision's arithmetic)."""
    short = int(image_size / EVAL_CROP_RATIO)
    # torchvision Resize(int): shorter side -> short, longer side int(short * long / shorter) (truncated).
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    # CenterCrop: offset int(round((side - crop) / 2)).
    return EvalGeometry(width, height, rw, rh, int(round((rw - image_size) / 2.0)),
                        int(round((rh - image_size) / 2.0)), image_size)


def crop_box_to_original(box: tuple[int, int, int, int], g: EvalGeometry) -> tuple[int, int, int, int]:
    """A box in crop pixels (inclusive) -> the original image's pixels (inclusive), covering the same area."""
    sx, sy = g.width / g.resized_width, g.height / g.resized_height
    x0 = math.floor((box[0] + g.left) * sx + 1e-9)
    y0 = math.floor((box[1] + g.top) * sy + 1e-9)
    x1 = math.ceil((box[2] + 1 + g.left) * sx - 1e-9) - 1
    y1 = math.ceil((box[3] + 1 + g.top) * sy - 1e-9) - 1
    return (min(max(x0, 0), g.width - 1), min(max(y0, 0), g.height - 1),
            min(max(x1, 0), g.width - 1), min(max(y1, 0), g.height - 1))


def box_iou(a, b) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1), with the devkits' +1 widths."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def localization_correct(guesses: list[tuple[int, tuple]], label: int, gt_boxes: list[tuple[int, tuple]],
                         top: int = TOP_K) -> bool:
    """ILSVRC: one of the first `top` (class, box) guesses has the true class and IoU >= 0.5 with a box of it."""
    return any(c == label and any(g == c and box_iou(box, gb) >= IOU_THRESHOLD for g, gb in gt_boxes)
               for c, box in guesses[:top])


# -- prediction over shards (one call per rank range; Ray tasks when spread) --------------------------------------

def iter_raw_samples(url: str, split: str, rank: int, world_size: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of a rank's contiguous range of a split, in index order (the loader's evaluation ranges).

    The loader yields transformed pixels only; boxes need the original size and the shard's `<key>.json`.
    """
    url = url.rstrip("/")
    info = read_index(url).split(split, url)
    start, size = rank_range(info.samples, rank, world_size, train=False)
    fs, root = fsspec.core.url_to_fs(url)
    for piece in pieces_of(info.shards, start, start + size):
        for key, _, members in read_piece(fs, root.rstrip("/"), url, piece):
            yield key, members


def sample_truth(key: str, members: dict[str, bytes], class_index: dict[str, int]) -> tuple[int, list]:
    """(label or -1, [(class, box), ...]) from a sample's `cls` and `json` members."""
    label = int(members["cls"]) if "cls" in members else -1
    if "json" not in members:
        raise ShardFormatError(f"sample {key!r} has no json member (boxes and size); re-run jobs.prepare")
    meta = json.loads(members["json"])
    unknown = sorted({b["wnid"] for b in meta.get("boxes", [])} - set(class_index))
    if unknown:
        raise ShardFormatError(f"sample {key!r} has boxes of wnids {unknown} that are not in index.json's classes")
    return label, [(class_index[b["wnid"]], (b["xmin"], b["ymin"], b["xmax"], b["ymax"]))
                   for b in meta.get("boxes", [])]


@torch.no_grad()
def predict_batch(model: nn.Module, images: list[torch.Tensor], image_size: int, threshold: float) -> list[dict]:
    """Top-5 classes, scores and original-pixel boxes of decoded uint8 [3, H, W] images."""
    transform = eval_transform(image_size)
    batch = normalize(torch.stack([transform(im) for im in images]), next(model.parameters()).device)
    logits, features = cam_forward(model, batch)
    scores, classes = logits.float().softmax(1).topk(min(TOP_K, logits.shape[1]), dim=1)
    cams = None if features is None else class_activation_maps(features, cam_head(model)[1].weight, classes).cpu()
    scores, classes = scores.cpu(), classes.cpu()
    out = []
    for i, image in enumerate(images):
        g = eval_geometry(image.shape[2], image.shape[1], image_size)
        if cams is None:  # no GAP head (AlexNet): the whole image stands for every guess
            boxes = [(0, 0, g.width - 1, g.height - 1)] * classes.shape[1]
        else:
            boxes = [crop_box_to_original(cam_box(cams[i, j], image_size, threshold), g)
                     for j in range(classes.shape[1])]
        out.append({"width": g.width, "height": g.height, "classes": classes[i].tolist(),
                    "scores": [round(s, 6) for s in scores[i].tolist()], "boxes": [list(b) for b in boxes]})
    return out


def predict_range(cfg_dict: dict, weights: dict, classes: list[str], url: str, split: str, rank: int,
                  world_size: int, *, batch_size: int, image_size: int, threshold: float = CAM_THRESHOLD) -> list[dict]:
    """Predictions for one rank range of a split: one record per sample, corrupt images included (flagged)."""
    model = build_inference_model(config_from_dict(cfg_dict), weights, len(classes)).to(default_device())
    class_index = {w: i for i, w in enumerate(classes)}
    records: list[dict] = []
    pending: list[tuple[dict, torch.Tensor]] = []

    def flush() -> None:
        for rec, pred in zip([r for r, _ in pending], predict_batch(model, [im for _, im in pending], image_size,
                                                                    threshold)):
            rec.update(pred)
        pending.clear()

    for key, members in iter_raw_samples(url, split, rank, world_size):
        label, boxes = sample_truth(key, members, class_index)
        record = {"key": key, "label": label, "gt_boxes": [[c, *b] for c, b in boxes]}
        records.append(record)
        image_member = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        try:
            if image_member is None:
                raise CorruptImageError(key, f"no image member (members: {', '.join(sorted(members))})")
            pending.append((record, decode_rgb(members[image_member], key)))
        except CorruptImageError as e:
            record.update(corrupt=e.reason, classes=[], scores=[], boxes=[])
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return records


def run_predictions(ck: CheckpointWeights, url: str, split: str, *, workers: int, batch_size: int,
                    image_size: int, threshold: float = CAM_THRESHOLD, gpus_per_worker: float = 0) -> list[dict]:
    """Predict a whole split: in this process (workers=1) or one Ray task per rank range (Ray already up).

    Tasks run on a GPU when given one (`gpus_per_worker`), else on their CPU. Every sample is predicted exactly
    once: the record count is checked against index.json.
    """
    url = storage_uri(url)  # Ray workers do not run in this process's directory: hand them absolute local paths
    index = read_index(url)
    expected = index.split(split, url).samples
    kw = dict(batch_size=batch_size, image_size=image_size, threshold=threshold)
    cfg_dict = ck.cfg.to_dict()
    if workers == 1:
        records = predict_range(cfg_dict, ck.weights, index.classes, url, split, 0, 1, **kw)
    else:
        import ray

        task = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_retries=2)(predict_range)
        weights = ray.put(ck.weights)
        refs = [task.remote(cfg_dict, weights, index.classes, url, split, r, workers, **kw) for r in range(workers)]
        records = [rec for part in ray.get(refs) for rec in part]
    if len(records) != expected or len({r["key"] for r in records}) != expected:
        raise RuntimeError(f"{url} split {split!r}: {len(records)} predictions for {expected} samples")
    return sorted(records, key=lambda r: r["key"])


def prediction_string(record: dict, classes: list[str], label_format: str) -> str:
    """Kaggle's `label x_min y_min x_max y_max` per guess, space separated.

    id: 1-based line number in LOC_synset_mapping.txt ("line 1 ... is class 1"), which is our class index + 1
    because the mapping lists the wnids in sorted order (data/layout.py checks it); wnid: the synset id.
    """
    parts = []
    for c, box in zip(record["classes"], record["boxes"]):
        label = str(c + 1) if label_format == "id" else classes[c]
        parts.append(" ".join([label, *map(str, box)]))
    return " ".join(parts)


def write_submission(records: list[dict], out: str, classes: list[str], label_format: str) -> None:
    """The Kaggle CSV (header `ImageId,PredictionString`, one row per image, sorted by id) to any fsspec URL."""
    if label_format not in ("id", "wnid"):
        raise ValueError(f"label_format={label_format!r}; valid: 'id', 'wnid'")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageId", "PredictionString"])
    for r in records:
        writer.writerow([r["key"], prediction_string(r, classes, label_format)])
    with fsspec.open(out, "w") as f:
        f.write(buf.getvalue())


def localization_summary(records: list[dict]) -> dict:
    """Top-1/top-5 localization and classification error over labelled records with ground-truth boxes."""
    scored = [r for r in records if r["label"] >= 0 and r["gt_boxes"]]
    if not scored:
        raise ValueError("no labelled image with ground-truth boxes: localization error needs the val split")
    counts = {"loc1": 0, "loc5": 0, "cls1": 0, "cls5": 0}
    for r in scored:
        guesses = list(zip(r["classes"], r["boxes"]))
        gt = [(b[0], tuple(b[1:])) for b in r["gt_boxes"]]
        counts["loc1"] += not localization_correct(guesses, r["label"], gt, top=1)
        counts["loc5"] += not localization_correct(guesses, r["label"], gt, top=TOP_K)
        counts["cls1"] += r["classes"][:1] != [r["label"]]
        counts["cls5"] += r["label"] not in r["classes"][:TOP_K]
    n = len(scored)
    return {"images": n, "images_without_boxes_or_label": len(records) - n,
            "top1_localization_error": counts["loc1"] / n, "top5_localization_error": counts["loc5"] / n,
            "top1_classification_error": counts["cls1"] / n, "top5_classification_error": counts["cls5"] / n}


def prediction_summary(ck: CheckpointWeights, records: list[dict], data_url: str, split: str, *, image_size: int,
                       submission: str, label_format: str, threshold: float) -> dict:
    """predict's JSON sidecar: provenance, counts, how boxes were made, and the localization error on val."""
    corrupt = [r["key"] for r in records if r.get("corrupt")]
    boxes = (f"class activation maps, threshold {threshold} of the min-max normalised map, largest 8-connected "
             "component" if model_has_cam(ck.cfg)
             else f"whole image: {ck.cfg.model.name} has no global-average-pooling head, so CAM does not apply")
    return {"kind": PREDICT_KIND, "checkpoint": ck.url, "model": ck.cfg.model.name, "weights": ck.source,
            "step": ck.step, "data": data_url, "split": split, "image_size": image_size, "submission": submission,
            "label_format": label_format, "images": len(records), "corrupt": corrupt, "boxes": boxes,
            "localization": localization_summary(records) if split != "test" else None}


# -- published figures and results pages -----------------------------------------------------------------------

def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def published_rows(names=REFERENCE_MODELS) -> list[dict]:
    """Single-model, single-crop ILSVRC-2012 val figures (%) from models/published.py, one row per source."""
    return [{"model": DISPLAY_NAMES.get(n, n), "top1": p.top1, "top5": p.top5, "source": p.source, "note": p.note}
            for n in names for p in published_for(n)]


def results_markdown(results: dict) -> str:
    """The evaluation page: this checkpoint beside the published figures, per-class accuracy, confused pairs."""
    name = DISPLAY_NAMES.get(results["model"], results["model"])
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"{name} ({results['weights']} weights, step {results['step']}, epoch {results['epoch']}) on "
             f"{results['data']} split `{results['split']}`: {results['centre']['samples']} images at "
             f"{results['image_size']} px, {len(results['corrupt'])} corrupt skipped.", "",
             "| model | protocol | top-1 % | top-5 % | source |", "|---|---|---:|---:|---|"]
    for proto, key in (("1 centre crop", "centre"), ("10-crop", "ten_crop")):
        if results.get(key):
            r = results[key]
            lines.append(f"| **{name} (this checkpoint)** | {proto} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} "
                         f"| this evaluation |")
    for row in published_rows(dict.fromkeys([*REFERENCE_MODELS, results["model"]])):
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['model']} | 1 centre crop, 224 px | {_pct(row['top1'])} | {_pct(row['top5'])} | "
                     f"{row['source']}{note} |")
    lines += ["", "Published figures are ImageNet-1k (1000 classes, 50,000 val images); compare only runs on the "
              "same data.", ""]
    best = results.get("ten_crop") or results["centre"]
    lines += [f"## Per-class accuracy ({'10-crop' if results.get('ten_crop') else 'centre crop'})", "",
              "| class | wnid | images | top-1 % | top-5 % |", "|---|---|---:|---:|---:|"]
    rows = sorted((c for c in best["per_class"] if c["samples"]), key=lambda c: c["top1"])
    shown = rows if len(rows) <= 20 else rows[:10] + rows[-10:]
    if len(rows) > 20:
        lines.insert(len(lines) - 2, "The ten worst and ten best classes; all are in results.json.\n")
    for c in shown:
        lines.append(f"| {c['name']} | {c['wnid']} | {c['samples']} | {100 * c['top1']:.1f} | {100 * c['top5']:.1f} |")
    lines += ["", "## Most confused pairs", "", "| true | predicted (top-1) | images | share of the true class |",
              "|---|---|---:|---:|"]
    for p in best["confused_pairs"]:
        lines.append(f"| {p['true_name']} ({p['true']}) | {p['predicted_name']} ({p['predicted']}) | {p['count']} | "
                     f"{100 * p['share']:.1f} % |")
    if not best["confused_pairs"]:
        lines.append("| — | — | 0 | — |")
    return "\n".join(lines) + "\n"


def default_results_dir(checkpoint_url: str) -> str:
    """Beside the checkpoint in its run folder when local, else the current directory."""
    fs, path = fsspec.core.url_to_fs(checkpoint_url)
    return os.path.dirname(path.rstrip("/")) if isinstance(fs, LocalFileSystem) else os.getcwd()


def write_results(results: dict, out_dir: str) -> tuple[str, str]:
    """results.json and results.md into `out_dir` (any fsspec URL); returns their URLs."""
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    urls = (join(out_dir, RESULTS_JSON), join(out_dir, RESULTS_MD))
    with fsspec.open(urls[0], "w") as f:
        f.write(json.dumps(results, indent=1))
    with fsspec.open(urls[1], "w") as f:
        f.write(results_markdown(results))
    return urls


# -- the cross-run report ---------------------------------------------------------------------------------------

@dataclass
class RunResults:
    """What one run folder holds for the report."""

    name: str
    url: str
    summary: dict | None
    config: dict | None  # config.yaml, for runs without summary.json (stopped or still running)
    metrics: list[dict]
    evaluation: dict | None  # results.json of jobs.evaluate
    localization: dict | None  # a predict sidecar with a localization error (val)


def read_run(url: str) -> RunResults:
    run = RunFolder(url)
    if not run.fs.exists(run.path):
        raise FileNotFoundError(f"run folder {url} does not exist")
    text = run.read_text("summary.json")
    evaluation = run.read_text(RESULTS_JSON)
    localization = None
    for path in sorted(run.fs.glob(join(run.path, "*.json"))):
        with run.fs.open(path, "r") as f:
            doc = json.load(f)
        if isinstance(doc, dict) and doc.get("kind") == PREDICT_KIND and doc.get("localization"):
            localization = doc
    config = yaml.safe_load(run.read_text("config.yaml") or "null")
    return RunResults(run.uri.rsplit("/", 1)[-1], run.uri, json.loads(text) if text else None, config,
                      run.read_jsonl("metrics.jsonl"), json.loads(evaluation) if evaluation else None, localization)


def run_row(run: RunResults) -> dict:
    """One run's figures (fractions): best val top-1/top-5 from summary.json, else from metrics.jsonl."""
    evals = [r for r in run.metrics if r.get("kind") == "eval"]
    best = max(evals, key=lambda r: r["val_top1"], default=None)
    s, cfg = run.summary or {}, run.config or {}
    row = {"run": run.name,
           "model": s.get("model") or cfg.get("model", {}).get("name") or (run.evaluation or {}).get("model"),
           "strategy": s.get("strategy") or cfg.get("strategy", {}).get("name"),
           "workers": s.get("world_size") or cfg.get("run", {}).get("num_workers"),
           "epochs": s.get("epochs", best["epoch"] if best else None),
           "top1": s.get("best_top1", best["val_top1"] if best else None),
           "top5": s.get("best_top5", best["val_top5"] if best else None),
           "eval_top1": None, "eval_top5": None, "eval_protocol": None, "loc5": None}
    if run.evaluation:
        r = run.evaluation.get("ten_crop") or run.evaluation["centre"]
        row.update(eval_top1=r["top1"], eval_top5=r["top5"],
                   eval_protocol="10-crop" if run.evaluation.get("ten_crop") else "centre crop")
    if run.localization:
        row["loc5"] = run.localization["localization"]["top5_localization_error"]
    return row


def report_markdown(runs: list[RunResults], chart: str) -> str:
    rows = [run_row(r) for r in runs]
    f = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
    lines = ["# Runs beside the ILSVRC results", "", f"![top-5 error and training curves]({chart})", "",
             "## Runs", "", "| run | model | strategy | workers | epochs | best val top-1 % | best val top-5 % | "
             "evaluated top-1 % | evaluated top-5 % | protocol | top-5 loc. error % |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model'] or '—'} | {r['strategy'] or '—'} | {r['workers'] or '—'} "
                     f"| {r['epochs'] or '—'} | {f(r['top1'])} | {f(r['top5'])} | {f(r['eval_top1'])} "
                     f"| {f(r['eval_top5'])} | {r['eval_protocol'] or '—'} | {f(r['loc5'])} |")
    lines += ["", "Best val figures come from the training run's evaluations (summary.json / metrics.jsonl); "
              "evaluated ones from `jobs.evaluate` (results.json); localization error from `jobs.predict --split val`.",
              "", "## ILSVRC classification winners (top-5 error on the test set)", "",
              "Ensembles and multi-crop on the ILSVRC test set: not comparable with a single model on val.", "",
              "| year | team | model | top-5 error % | source |", "|---:|---|---|---:|---|"]
    for w in ILSVRC_WINNERS:
        lines.append(f"| {w.year} | {w.team} | {w.model} | {w.top5_error:.2f} | {w.source} |")
    first = min(w.year for w in ILSVRC_WINNERS)
    if first > 2010:
        lines.append(f"\nmodels/published.py lists winners from {first}; 2010-{first - 1} are not recorded there.")
    lines += ["", "## Published single models (ILSVRC-2012 val, 1 centre crop)", "",
              "| model | top-1 % | top-5 % | source |", "|---|---:|---:|---|"]
    for p in published_rows():
        lines.append(f"| {p['model']} | {_pct(p['top1'])} | {_pct(p['top5'])} | {p['source']} |")
    return "\n".join(lines) + "\n"


def report_chart(runs: list[RunResults], path: str) -> None:
    """PNG: top-5 error of the winners by year and of the runs; training loss; val top-1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = [f"{w.year}\n{w.model.split(' ')[0]}" for w in ILSVRC_WINNERS]
    values = [w.top5_error for w in ILSVRC_WINNERS]
    colours = ["0.6"] * len(values)
    for row in map(run_row, runs):
        top5 = row["eval_top5"] if row["eval_top5"] is not None else row["top5"]
        if top5 is not None:
            labels.append(row["run"])
            values.append(100 * (1 - top5))
            colours.append("tab:blue")
    ax1.bar(range(len(values)), values, color=colours)
    ax1.set_xticks(range(len(values)), labels, fontsize=7)
    ax1.set(ylabel="top-5 error %", title="ILSVRC winners (grey, test) and runs (blue, val)")
    for run in runs:
        trains = [r for r in run.metrics if r.get("kind") == "train"]
        evals = [r for r in run.metrics if r.get("kind") == "eval"]
        ax2.plot([r["step"] for r in trains], [r["loss"] for r in trains], label=run.name)
        ax3.plot([r["epoch"] for r in evals], [r["val_top1"] for r in evals], marker="o", label=run.name)
    ax2.set(xlabel="step", ylabel="training loss", title="training loss")
    ax3.set(xlabel="epoch", ylabel="val top-1", ylim=(0, 1), title="validation top-1")
    for ax in (ax2, ax3):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
