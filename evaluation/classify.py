"""Classification accuracy of a checkpoint, torchvision's reference protocol: resize the shorter side to
image_size / 0.875 and one centre crop (data.eval_loader decodes that region crop first: equal to the preset up to
rounding); optionally the ten crops of `TenCrop` (four corners and centre, and the same mirrored) of the resized
image with their softmax averaged (Krizhevsky et al. 2012, sec. 4.1). The centre crop is the fifth of the ten, so
one pass gives both. Counts are exact: a confusion matrix, top-5 hits and the summed loss per protocol."""
from __future__ import annotations

import torch
from torch import nn

from data import StreamOptions, eval_loader, normalize, read_index
from distributed.accuracy import AccuracyTally
from evaluation.checkpoints import CheckpointWeights, build_inference_model, default_device
from evaluation.report import EVALUATE_KIND, published_rows
from models import split_outputs

CENTRE_OF_TEN = 4  # TenCrop order: top-left, top-right, bottom-left, bottom-right, centre, then mirrored


def split_loader(url: str, split: str, *, image_size: int, batch_size: int, loader_workers: int, ten_crop: bool):
    """One process's loader over a whole split (data.eval_loader); 10-crop batches are uint8 [b, 10, 3, S, S]."""
    opts = StreamOptions(url, image_size=image_size, eval_batch_size=batch_size, loader_workers=loader_workers)
    return eval_loader(opts, 0, 1, split, ten_crop=ten_crop)


@torch.no_grad()
def crop_log_probs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the centre crop, and of the 10-crop average when `images` holds ten crops per image.

    The centre crop's are log_softmax of the logits, as in the training loop's evaluation."""
    device = next(model.parameters()).device
    if images.dim() == 4:
        return split_outputs(model(normalize(images, device)))[0].float().log_softmax(1), None
    b, n = images.shape[:2]
    logits = split_outputs(model(normalize(images.flatten(0, 1), device)))[0].float().view(b, n, -1)
    return logits[:, CENTRE_OF_TEN].log_softmax(1), logits.softmax(2).mean(1).clamp_min(1e-12).log()


def tally_summary(tally: AccuracyTally, classes: list[str], names: list[str], pairs: int = 10) -> dict:
    """A protocol's figures: top-1/top-5/loss, per class, and the most confused pairs."""
    totals = tally.totals()
    confusion, top5 = tally.per_class()
    per_true, hits1, hits5 = confusion.sum(1).tolist(), confusion.diag().tolist(), top5.tolist()
    per_class = [{"class": c, "wnid": classes[c], "name": names[c], "samples": per_true[c],
                  "top1": hits1[c] / per_true[c] if per_true[c] else None,
                  "top5": hits5[c] / per_true[c] if per_true[c] else None}
                 for c in range(len(classes))]
    return {"samples": totals["samples"], "top1": totals["top1"], "top5": totals["top5"], "loss": totals["loss"],
            "per_class": per_class, "confused_pairs": confused_pairs(confusion, classes, names, pairs)}


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
    """Run a loader through the model; returns {"centre": AccuracyTally, "ten_crop": AccuracyTally | None,
    "corrupt": keys}."""
    device = next(model.parameters()).device
    centre, ten, corrupt = AccuracyTally(num_classes, device), None, []
    for batch in loader:
        corrupt += batch["corrupt"]
        if len(batch["label"]) == 0:
            continue
        labels = batch["label"]
        if (labels < 0).any():
            raise ValueError("the split has unlabelled samples (label -1): evaluate the val split, not test")
        lp_centre, lp_ten = crop_log_probs(model, batch["image"])
        centre.add_log_probs(lp_centre, labels)
        if lp_ten is not None:
            ten = ten or AccuracyTally(num_classes, device)
            ten.add_log_probs(lp_ten, labels)
    if centre.totals()["samples"] == 0:
        raise ValueError("evaluation saw no decodable images")
    return {"centre": centre, "ten_crop": ten, "corrupt": corrupt}


def evaluate_checkpoint(ck: CheckpointWeights, data_url: str, split: str = "val", *, image_size: int,
                        batch_size: int, loader_workers: int = 0, ten_crop: bool = False,
                        device: torch.device | None = None) -> dict:
    """The results document of jobs.evaluate: both protocols' figures, per class, confused pairs, provenance."""
    index = read_index(data_url)
    model = build_inference_model(ck.cfg, ck.weights, index.num_classes).to(device or default_device())
    loader = split_loader(data_url, split, image_size=image_size, batch_size=batch_size,
                          loader_workers=loader_workers, ten_crop=ten_crop)
    out = evaluate_model(model, loader, index.num_classes)
    seen, expected = out["centre"].totals()["samples"] + len(out["corrupt"]), index.split(split, data_url).samples
    if seen != expected:  # never report a figure over a silently different set of images
        raise RuntimeError(f"{data_url} split {split!r}: evaluated {seen} samples, _index.json lists {expected}")
    return {"kind": EVALUATE_KIND, "checkpoint": ck.url, "model": ck.cfg.model.name,
            "model_kwargs": ck.cfg.model.kwargs, "weights": ck.source, "step": ck.step, "epoch": ck.epoch,
            "role": ck.role, "score": ck.score,
            "data": data_url, "split": split, "image_size": image_size, "corrupt": out["corrupt"],
            "centre": tally_summary(out["centre"], index.classes, index.class_names),
            "ten_crop": tally_summary(out["ten_crop"], index.classes, index.class_names) if out["ten_crop"] else None,
            "published": published_rows()}
