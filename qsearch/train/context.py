"""The state a trial shares with its methods (what the plug-in hooks receive)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qsearch.data import DatasetBundle, iterate_batches

if TYPE_CHECKING:
    from qsearch.quant import QuantLayer
    from qsearch.spec import TrialConfig


@dataclass
class TrainContext:
    config: TrialConfig
    device: torch.device
    data: DatasetBundle
    model: nn.Module
    steps_per_epoch: int
    fp_model: nn.Module | None = None  # frozen FP32 warm-start partner, when a method asks
    qlayers: dict[str, QuantLayer] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    epoch: int = 0  # epochs completed before the current one
    step: int = 0  # global training step
    qat_start_epoch: int = 0  # a precision stage (CSQ) may consume the first epochs
    report: Callable[[dict[str, Any]], None] | None = None
    input_shape: tuple[int, int, int] = (1, 8, 8)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches of ``epoch``, on the device, in an order fixed by (seed, epoch)."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        for x, y in iterate_batches(self.data, "train", self.config.batch_size, shuffle=True,
                                    generator=g):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """(top-1 accuracy, mean loss) on the held-out split."""
        return evaluate(model or self.model, self.data, self.device, self.config.batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetBundle, device: torch.device, batch_size: int) -> tuple[float, float]:
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in iterate_batches(data, "test", max(batch_size, 256), shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(1, total), loss_sum / max(1, total)
