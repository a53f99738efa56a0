"""Optimizer and LR schedule construction shared by the FP32 warm start and QAT."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base LR at the start of ``epoch`` (0-based)."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    if schedule == "step":
        return 0.1 ** (epoch // max(1, math.ceil(epochs / 3)))
    return 1.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three named groups: latent weights of quantized layers, LSQ step sizes (no weight decay)
    and everything else. Methods find their group by ``group["name"]``."""
    from qsearch.quant import QuantLayer

    qweights, steps, other = [], [], []
    qweight_ids = {id(m.weight) for m in model.modules() if isinstance(m, QuantLayer)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in qweight_ids:
            qweights.append(p)
        elif name.endswith(".step"):
            steps.append(p)
        else:
            other.append(p)
    groups = [
        {"name": "qweights", "params": qweights, "weight_decay": weight_decay},
        {"name": "steps", "params": steps, "weight_decay": 0.0},
        {"name": "other", "params": other, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, kind: str, lr: float, momentum: float, weight_decay: float,
    groups: list[dict] | None = None, nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (heavy-ball momentum; Nesterov only when ``nesterov`` and ``momentum > 0``) or Adam
    over ``groups`` — named param groups that may set their own ``lr``/``weight_decay`` (a
    training stage's) — or, by default, the shared groups of :func:`param_groups`."""
    if groups is None:
        groups = param_groups(model, weight_decay)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def build_scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, _Schedule(schedule, epochs))


class _Schedule:
    """Picklable LR lambda (LambdaLR stores callable objects' state in its state_dict)."""

    def __init__(self, schedule: str, epochs: int):
        self.schedule, self.epochs = schedule, epochs

    def __call__(self, epoch: int) -> float:
        return lr_factor(self.schedule, epoch, self.epochs)
