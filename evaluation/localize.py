"""Boxes from class activation maps and the ILSVRC localization criterion.

CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016): for a network that ends in
global average pooling and one Linear, CAM_c = sum_k w_ck f_k(x, y) over the last convolutional feature map. The
map is upsampled to the crop, min-max normalised, thresholded at 20 % and the largest connected component
(8-connectivity) is boxed, then mapped back through the crop and the resize. Localization error is ILSVRC's: an
image counts as correct when one of its (up to) five guesses has the true class and IoU >= 0.5 with a ground-truth
box of that class. Boxes are inclusive pixel coordinates, IoU with the +1 widths of the PASCAL VOC / ILSVRC devkits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.transforms import EVAL_CROP_RATIO
from distributed.accuracy import TOP_K  # guesses per image: top-5 accuracy and the Kaggle submission
from distributed.config import Config
from models import get_model, split_outputs, unwrap_model

CAM_THRESHOLD = 0.2  # Zhou et al. 2016, sec. 3: "above 20% of the max value of the CAM"
IOU_THRESHOLD = 0.5  # ILSVRC localization criterion


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
