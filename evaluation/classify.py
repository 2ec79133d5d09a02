"""Classification accuracy of a checkpoint, torchvision's reference protocol: resize the shorter side to
image_size / 0.875 and one centre crop (data.eval_loader decodes that region crop first: equal to the preset up to
rounding); optionally the ten crops of `TenCrop` (four corners and centre, and the same mirrored) of the resized
image with their softmax averaged (Krizhevsky et al. 2012, sec. 4.1). The centre crop is the fifth of the ten, so
one pass gives both. Counts are exact: a confusion matrix, top-5 hits and the summed loss per protocol."""
from __future__ import annotations

import torch
from torch import nn

from data import StreamOptions, eval_loader, normalize, read_index
from evaluation.checkpoints import CheckpointWeights, build_inference_model, default_device
from evaluation.localize import TOP_K
from evaluation.report import EVALUATE_KIND, published_rows
from models import split_outputs

CENTRE_OF_TEN = 4  # TenCrop order: top-left, top-right, bottom-left, bottom-right, centre, then mirrored


def split_loader(url: str, split: str, *, image_size: int, batch_size: int, num_workers: int, ten_crop: bool):
    """One process's loader over a whole split (data.eval_loader); 10-crop batches are uint8 [b, 10, 3, S, S]."""
    opts = StreamOptions(url, image_size=image_size, eval_batch_size=batch_size, loader_workers=num_workers)
    return eval_loader(opts, 0, 1, split, ten_crop=ten_crop)


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
    loader = split_loader(data_url, split, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                          ten_crop=ten_crop)
    out = evaluate_model(model, loader, index.num_classes)
    seen, expected = int(out["centre"].confusion.sum()) + len(out["corrupt"]), index.split(split, data_url).samples
    if seen != expected:  # never report a figure over a silently different set of images
        raise RuntimeError(f"{data_url} split {split!r}: evaluated {seen} samples, _index.json lists {expected}")
    return {"kind": EVALUATE_KIND, "checkpoint": ck.url, "model": ck.cfg.model.name,
            "model_kwargs": ck.cfg.model.kwargs, "weights": ck.source, "step": ck.step, "epoch": ck.epoch,
            "data": data_url, "split": split, "image_size": image_size, "corrupt": out["corrupt"],
            "centre": out["centre"].summary(index.classes, index.class_names),
            "ten_crop": out["ten_crop"].summary(index.classes, index.class_names) if out["ten_crop"] else None,
            "published": published_rows()}
