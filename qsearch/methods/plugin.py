"""The plug-in interface between the shared trainer and the QAT methods.

A QAT technique is a :class:`Method` subclass (the *handler*) plus a torch-free config section
registered with :func:`qsearch.config.methods.register_method`, which also fixes its hook
order. The trainer builds the enabled handlers with :func:`build_methods` and calls the hooks
below, for every enabled method in registry order::

    precision_stage   once, before LSQ conversion (CSQ learns per-layer bits here, by running
                      training stages through ``ctx.trainer`` — the shared loop)
    attach            once, after conversion and warm start, before the optimizer exists
    configure_optimizer  once, right after the optimizer is built
    -- every step --
    before_forward    before the model's forward
    loss              may add terms to (or replace) the task loss
    after_backward    gradients exist, optimizer has not stepped
    after_step        the optimizer has stepped
    -- every epoch --
    epoch_end         after the last step of an epoch, before evaluation
    metrics           numbers for the per-epoch report (keys are prefixed with the name)

``layer_stats`` feeds the cost model (per-layer gradient bits, frozen fraction) and
``extra_backward_bops`` adds the cost of extra branches. Method state that must survive a
resume goes in ``state_dict`` (tensors and plain values only; loaded with weights_only=True)
or in module buffers the method registers on the model.

Methods talk to each other only through :class:`TrainContext` and the trainer: one method never
imports another's module.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qsearch.config.methods import MethodConfig, method_entries
from qsearch.data import DatasetBundle, iterate_batches
from qsearch.data.evaluate import evaluate

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig
    from qsearch.quant import QuantLayer


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

    def evaluate(self, model: nn.Module | None = None, split: str = "val") -> tuple[float, float]:
        """(top-1 accuracy, mean loss) on the validation split — all a method or the per-epoch
        report may look at; ``(nan, nan)`` without one (``data.val_fraction: 0``). The trainer
        alone measures ``split="test"``, once, on a finished trial's final weights."""
        return evaluate(model or self.model, self.data, self.device, self.config.batch_size,
                        split=split)


class Method(ABC):  # noqa: B024 - every hook has a do-nothing default on purpose
    """One QAT technique plugged into the trainer. Override only the hooks you need."""

    #: The ``methods.<name>`` key; set from the registry entry when the method is built.
    name: str = ""
    #: Set to True when the method needs the frozen FP32 warm-start model (``ctx.fp_model``).
    needs_fp_partner: ClassVar[bool] = False

    def __init__(self, config: MethodConfig):
        self.config = config

    # -- set-up ------------------------------------------------------------------------
    def precision_stage(self, ctx: TrainContext) -> dict[str, int] | None:
        """Run before LSQ conversion; return per-layer weight bits to use, or None."""
        return None

    def attach(self, ctx: TrainContext) -> None:
        """Install buffers/hooks on the converted model (``ctx.qlayers``)."""

    def configure_optimizer(self, ctx: TrainContext) -> None:
        """Adjust ``ctx.optimizer`` (param groups, LRs) right after it is built."""

    # -- every step --------------------------------------------------------------------
    def before_forward(self, ctx: TrainContext) -> None:
        """Called before each training forward (``ctx.step`` is the global step)."""

    def loss(
        self,
        ctx: TrainContext,
        x: torch.Tensor,
        y: torch.Tensor,
        logits: torch.Tensor,
        loss: torch.Tensor,
    ) -> torch.Tensor:
        """Return the loss to minimise; the default keeps ``loss`` unchanged."""
        return loss

    def after_backward(self, ctx: TrainContext) -> None:
        """Gradients are populated; the optimizer has not stepped yet."""

    def after_step(self, ctx: TrainContext) -> None:
        """The optimizer has stepped."""

    # -- every epoch -------------------------------------------------------------------
    def epoch_end(self, ctx: TrainContext) -> None:
        """The epoch's training steps are done (before evaluation)."""

    def metrics(self, ctx: TrainContext) -> dict[str, float]:
        """Per-epoch numbers; the trainer prefixes the keys with ``<name>.``."""
        return {}

    # -- cost model --------------------------------------------------------------------
    def layer_stats(self, ctx: TrainContext) -> dict[str, dict[str, float]]:
        """Per quantized layer: ``g_bits`` and/or ``frozen_fraction`` for the cost model."""
        return {}

    def extra_backward_bops(self, ctx: TrainContext) -> float:
        """Backward-pass bit operations per sample that the method adds (extra branches)."""
        return 0.0

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def build_methods(config: TrialConfig) -> list[Method]:
    """Instantiate the enabled methods' handlers, in registry (hook) order."""
    out: list[Method] = []
    for entry in method_entries():
        section = config.methods[entry.name]
        if section.enabled:
            handler = entry.load_handler()
            method = handler(section)
            method.name = entry.name
            out.append(method)
    return out
