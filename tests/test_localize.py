"""The evaluation package's box geometry and scoring as units: connected components, CAM boxes, the eval crop
mapped back to the original image, IoU and the localization error, CAMs of GAP heads, AlexNet's whole-image boxes."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from data.transforms import eval_transform
from evaluation import localize
from evaluation import predict as prediction
from models import get_model

NUM_CLASSES = 3
IMAGE_SIZE = 64  # 2x2 last feature map in GoogLeNet: small, but CAMs still vary across the image
pytestmark = pytest.mark.usefixtures("one_thread")


def _bfs_components(mask: np.ndarray) -> list[tuple[int, tuple]]:
    """Reference: (area, box) of every 8-connected component, by breadth-first search."""
    seen, out = np.zeros_like(mask), []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, pixels = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny in range(max(cy - 1, 0), min(cy + 2, mask.shape[0])):
                for nx in range(max(cx - 1, 0), min(cx + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        ys, xs = zip(*pixels)
        out.append((len(pixels), (int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys)))))
    return out


def test_largest_component_box_matches_bfs():
    assert localize.largest_component_box(np.zeros((5, 5), bool)) is None
    assert localize.largest_component_box(np.eye(6, dtype=bool)) == (0, 0, 5, 5)  # diagonal steps connect
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.uniform(0.2, 0.6)
        components = _bfs_components(mask)
        if not components:
            assert localize.largest_component_box(mask) is None
            continue
        largest = max(a for a, _ in components)
        assert localize.largest_component_box(mask) in {box for a, box in components if a == largest}


def test_cam_box_on_synthetic_maps():
    cam = torch.full((32, 32), 0.1)
    cam[5:10, 20:30] = 1.0  # 50 pixels
    cam[25:28, 2:6] = 0.9  # 12 pixels: above the threshold, but smaller
    assert localize.cam_box(cam, 32) == (20, 5, 29, 9)  # same size: upsampling is the identity
    up = localize.cam_box(cam, 64)  # 2x: the region doubles, give or take the bilinear edge
    assert abs(up[0] - 40) <= 1 and abs(up[1] - 10) <= 1 and abs(up[2] - 59) <= 1 and abs(up[3] - 19) <= 1
    assert localize.cam_box(torch.ones(1, 1), 16) == (0, 0, 15, 15)  # constant map: no location, whole crop


@pytest.mark.parametrize("width,height", [(150, 100), (97, 160), (123, 123), (500, 375)])
def test_crop_box_maps_back_through_resize_and_crop(width, height):
    g = localize.eval_geometry(width, height, IMAGE_SIZE)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    assert v2.Resize(int(IMAGE_SIZE / 0.875), antialias=True)(image).shape[1:] == (g.resized_height, g.resized_width)
    x0, y0, x1, y1 = width // 3, height // 3, width // 2, 2 * height // 3  # inside the centre crop
    image[:, y0:y1 + 1, x0:x1 + 1] = 255
    crop = eval_transform(IMAGE_SIZE)(image)
    ys, xs = torch.nonzero(crop[0] > 127, as_tuple=True)
    back = localize.crop_box_to_original((xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()), g)
    tol = max(width / g.resized_width, height / g.resized_height) + 1
    assert all(abs(a - b) <= tol for a, b in zip(back, (x0, y0, x1, y1))), (back, (x0, y0, x1, y1))
    whole = localize.crop_box_to_original((0, 0, IMAGE_SIZE - 1, IMAGE_SIZE - 1), g)
    assert 0 <= whole[0] <= whole[2] <= width - 1 and 0 <= whole[1] <= whole[3] <= height - 1


def test_iou_and_localization_error_by_hand():
    assert localize.box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert localize.box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert localize.box_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0
    gt = [[1, 0, 0, 9, 9]]
    half = (0, 0, 9, 19)  # IoU with the gt box: 100 / 200 = 0.5 exactly, which counts
    records = [
        {"label": 1, "gt_boxes": gt, "classes": [0, 2, 1], "boxes": [[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 10]]},
        {"label": 1, "gt_boxes": gt, "classes": [1, 0, 2], "boxes": [[5, 0, 14, 9], [0, 0, 9, 9], [0, 0, 9, 9]]},
        {"label": 1, "gt_boxes": gt, "classes": [0, 2, 3], "boxes": [[0, 0, 9, 9]] * 3},
        {"label": 1, "gt_boxes": gt, "classes": [1, 0, 2], "boxes": [list(half), [0, 0, 1, 1], [0, 0, 1, 1]]},
        {"label": 1, "gt_boxes": [], "classes": [1, 0, 2], "boxes": [[0, 0, 9, 9]] * 3},  # no boxes: left out
    ]
    # 1: class at guess 3, IoU 100/110 -> top-5 correct, top-1 wrong. 2: right class, IoU 1/3 -> wrong.
    # 3: right box, wrong classes -> wrong. 4: first guess, IoU 0.5 -> correct.
    out = prediction.localization_summary(records)
    assert out["images"] == 4 and out["images_without_boxes_or_label"] == 1
    assert out["top5_localization_error"] == 2 / 4 and out["top1_localization_error"] == 3 / 4
    assert out["top5_classification_error"] == 1 / 4 and out["top1_classification_error"] == 2 / 4


@pytest.mark.parametrize("name,kwargs", [("googlenet", {}), ("resnet50", {}), ("se_resnet50", {})])
def test_cam_is_exact_for_gap_heads(name, kwargs):
    """logit_c = mean over positions of CAM_c + bias: the feature map is the one right before GAP."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, features = localize.cam_forward(model, x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
    head = localize.cam_head(model)[1]
    classes = torch.arange(NUM_CLASSES).expand(2, -1)
    cams = localize.class_activation_maps(features, head.weight, classes)
    assert torch.allclose(cams.mean((2, 3)) + head.bias, logits, atol=1e-4)


def test_alexnet_gets_whole_image_boxes():
    model = get_model("alexnet", num_classes=NUM_CLASSES).eval()
    assert localize.cam_head(model) is None
    image = torch.randint(0, 255, (3, 90, 120), dtype=torch.uint8)
    [pred] = prediction.predict_batch(model, [image], IMAGE_SIZE, localize.CAM_THRESHOLD)
    assert pred["boxes"] == [[0, 0, 119, 89]] * NUM_CLASSES and len(pred["classes"]) == NUM_CLASSES
