"""The one accuracy tally, used by the training loop's evaluation and by evaluation/classify.py: exact counts
(a confusion matrix of top-1 guesses, top-5 hits per class, the summed negative log-likelihood) accumulated on
the device with scatter-adds (no host synchronisation per batch), summed across ranks, read once."""
from __future__ import annotations

import torch

from distributed.comm import all_reduce_sum

TOP_K = 5


class AccuracyTally:
    """Counts for one protocol over any number of batches; `totals()` reads them back in one host read."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)  # true x top-1
        self.top5 = torch.zeros(num_classes, dtype=torch.int64, device=device)  # top-5 hits per true class
        self.loss = torch.zeros((), dtype=torch.float64, device=device)  # summed -log p(true class)
        self.corrupt = 0  # images the loader could not decode (host count of this rank)
        self._corrupt_sum: torch.Tensor | None = None  # over ranks, after all_reduce

    def add_log_probs(self, log_probs: torch.Tensor, labels: torch.Tensor) -> None:
        """log_probs [b, C] (log-softmax of one crop, or log of averaged probabilities), labels [b] on the device."""
        labels = labels.to(self.confusion.device)
        top = log_probs.topk(min(TOP_K, log_probs.shape[1]), dim=1).indices
        ones = torch.ones_like(labels)
        # index_add_, not bincount: bincount sizes its output from the data, a host read on a GPU.
        self.confusion.index_add_(0, labels * self.num_classes + top[:, 0], ones)
        self.top5.index_add_(0, labels, top.eq(labels[:, None]).any(1).to(ones.dtype))
        self.loss -= log_probs.float().gather(1, labels[:, None]).sum().double()

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.add_log_probs(logits.float().log_softmax(1), labels)

    def all_reduce(self) -> None:
        """Sum the counts over ranks (collectives, no host read)."""
        all_reduce_sum(self.confusion)
        all_reduce_sum(self.top5)
        packed = torch.stack([self.loss, self.loss.new_tensor(float(self.corrupt))])
        all_reduce_sum(packed)
        self.loss, self._corrupt_sum = packed[0], packed[1]

    def totals(self) -> dict:
        """samples, top1, top5 (fractions), loss (mean) and corrupt: one host read."""
        confusion = self.confusion.view(self.num_classes, self.num_classes)
        corrupt = self._corrupt_sum if self._corrupt_sum is not None else self.loss.new_tensor(float(self.corrupt))
        hits1, hits5, loss, n, corrupt = torch.stack([confusion.diagonal().sum().double(), self.top5.sum().double(),
                                                      self.loss, confusion.sum().double(), corrupt]).tolist()
        nan = float("nan")
        return {"samples": int(n), "top1": hits1 / n if n else nan, "top5": hits5 / n if n else nan,
                "loss": loss / n if n else nan, "corrupt": int(corrupt)}

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(confusion [C, C], top-5 hits [C]) on the CPU, for per-class figures and confused pairs."""
        return self.confusion.view(self.num_classes, self.num_classes).cpu(), self.top5.cpu()
