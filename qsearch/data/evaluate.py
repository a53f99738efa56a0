"""Top-1 accuracy and mean loss of a model on one split of a dataset bundle."""

from __future__ import annotations

import math

import torch
from torch import nn

from qsearch.data.registry import DatasetBundle, iterate_batches


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetBundle, device: torch.device, batch_size: int,
             split: str = "val") -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) on ``split``. The default is the validation split,
    what a search may look at; pass ``split="test"`` only to report a finished model. A run
    without a validation split (``data.val_fraction: 0``) gets ``(nan, nan)`` for ``val``."""
    if split == "val" and not data.has_split("val"):
        return math.nan, math.nan
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in iterate_batches(data, split, max(batch_size, 256), shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(1, total), loss_sum / max(1, total)
