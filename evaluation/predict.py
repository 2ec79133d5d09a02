"""Prediction over a split's shards for the Kaggle localization submission: five classes and a CAM box per
image, one Ray task per rank range when spread, the CSV, and the localization error on val."""
from __future__ import annotations

import csv
import io
import json

import fsspec
import torch
from torch import nn

from data import read_index
from data.decode import CorruptImageError, decode_rgb
from data.layout import CSV_HEADER
from data.shards import ShardFormatError
from data.reader import IMAGE_EXTS, iter_raw_samples
from data.transforms import eval_transform, normalize
from distributed.config import config_from_dict
from distributed.run_folder import storage_uri
from evaluation.checkpoints import CheckpointWeights, build_inference_model, default_device
from evaluation.localize import (CAM_THRESHOLD, TOP_K, cam_box, cam_forward, cam_head, class_activation_maps,
                                 crop_box_to_original, eval_geometry, localization_correct, model_has_cam)
from evaluation.report import PREDICT_KIND


def sample_truth(key: str, members: dict[str, bytes], class_index: dict[str, int]) -> tuple[int, list]:
    """(label or -1, [(class, box), ...]) from a sample's `cls` and `json` members."""
    label = int(members["cls"]) if "cls" in members else -1
    if "json" not in members:
        raise ShardFormatError(f"sample {key!r} has no json member (boxes and size); re-run jobs.prepare")
    meta = json.loads(members["json"])
    unknown = sorted({b["wnid"] for b in meta.get("boxes", [])} - set(class_index))
    if unknown:
        raise ShardFormatError(f"sample {key!r} has boxes of wnids {unknown} that are not in _index.json's classes")
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
        image_member = next((e for e in IMAGE_EXTS if e in members), None)
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


def run_predictions(ck: CheckpointWeights, url: str, split: str, *, tasks: int, batch_size: int,
                    image_size: int, threshold: float = CAM_THRESHOLD, gpus_per_task: float = 0) -> list[dict]:
    """Predict a whole split: in this process (tasks=1) or one Ray task per rank range (Ray already up).

    Tasks run on a GPU when given one (`gpus_per_task`), else on their CPU. Every sample is predicted exactly
    once: the record count is checked against _index.json.
    """
    url = storage_uri(url)  # Ray tasks do not run in this process's directory: hand them absolute local paths
    index = read_index(url)
    expected = index.split(split, url).samples
    kw = dict(batch_size=batch_size, image_size=image_size, threshold=threshold)
    cfg_dict = ck.cfg.to_dict()
    if tasks == 1:
        records = predict_range(cfg_dict, ck.weights, index.classes, url, split, 0, 1, **kw)
    else:
        import ray

        task = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=2)(predict_range)
        weights = ray.put(ck.weights)
        refs = [task.remote(cfg_dict, weights, index.classes, url, split, r, tasks, **kw) for r in range(tasks)]
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
    writer.writerow(CSV_HEADER)
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
