"""The plug-in interface between the shared trainer and the QAT methods.

A QAT technique is a :class:`Method` subclass (the *handler*) plus a torch-free config section
registered with :func:`qsearch.config.methods.register_method`, which also fixes its hook
order. The trainer builds the enabled handlers with :func:`build_methods` and calls the hooks
below, for every enabled method in registry order::

    precision_stage   once, before LSQ conversion (CSQ learns per-layer bits here, by running
                      a :class:`Stage` through the shared loop with ``ctx.run_stage``)
    attach            once, after conversion and warm start, before the optimizer exists
    param_groups      once, before the optimizer is built: may split or add param groups
    configure_optimizer  once, right after the optimizer (and its LR schedule) is built
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

A method that trains a model of its own before QAT (CSQ's bit-plane search) describes it as a
:class:`Stage` and hands it to ``ctx.run_stage``: the trainer runs it with the same step (NaN
guard included), the same batch order, a report and a checkpoint after every stage epoch, and
resumes a trial killed mid stage from that checkpoint.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

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
    #: Set by the trainer: runs a :class:`Stage` through the shared loop (see ``run_stage``).
    stage_runner: Callable[[Stage], list[dict[str, Any]]] | None = None
    #: Set by the trainer: the trial's :class:`~qsearch.train.costs.TrainingCosts` (executed
    #: FLOPs and backward time of every step so far; LTS reads its skipped dW from it).
    costs: Any = None

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

    def run_stage(self, stage: Stage) -> list[dict[str, Any]]:
        """Train ``stage`` through the trainer's loop; returns its per-epoch reports (those of
        epochs restored from a stage checkpoint included)."""
        if self.stage_runner is None:
            raise RuntimeError("TrainContext.run_stage() needs a context from Trainer.setup()")
        return self.stage_runner(stage)


class Stage:
    """A training stage a method runs through the shared loop (``ctx.run_stage(stage)``).

    The trainer trains ``model`` for ``epochs`` epochs (global epochs ``ctx.epoch`` onwards,
    so the batches are those of those epochs) with one optimizer built by
    :func:`qsearch.train.optim.build_optimizer` from :meth:`param_groups`. Each step calls
    the hooks below (same meaning as the :class:`Method` hooks; the enabled methods' own hooks
    do not run: they are not attached yet). After each epoch it calls :meth:`epoch_end`,
    evaluates ``model`` on the validation split, reports ``{"epoch", "stage": name,
    "train_loss", "val_loss", "val_accuracy", "accuracy" (alias), **metrics()}`` and
    checkpoints model, optimizer, :meth:`state_dict`, the stage epoch and the RNG state.
    ``epoch`` (stage epochs completed before the current one) and ``batch`` (index of the
    current batch in its epoch) are kept up to date by the trainer.
    """

    def __init__(self, name: str, model: nn.Module, epochs: int):
        self.name = name  # reported as "stage"; names the stage in errors and checkpoints
        self.model = model
        self.epochs = epochs
        self.epoch = 0
        self.batch = 0

    def progress(self, ctx: TrainContext) -> float:
        """Stage time in fractional epochs at the current step."""
        return self.epoch + self.batch / ctx.steps_per_epoch

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        """Optimizer param groups (each may set its own ``lr``/``weight_decay``); None: the
        shared QAT groups of :func:`qsearch.train.optim.param_groups`."""
        return None

    def before_forward(self, ctx: TrainContext) -> None:
        """Before each forward (temperature schedules and the like)."""

    def loss(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to minimise (add regularizer terms here)."""
        return loss

    def after_backward(self, ctx: TrainContext) -> None:
        """Gradients are populated; the optimizer has not stepped yet."""

    def after_step(self, ctx: TrainContext) -> None:
        """The optimizer has stepped."""

    def epoch_end(self, ctx: TrainContext) -> None:
        """The stage epoch's steps are done (before evaluation and the report)."""

    def metrics(self, ctx: TrainContext) -> dict[str, Any]:
        """Per-epoch numbers merged into the report as they are (no prefix added)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Stage state beyond model and optimizer (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


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

    def param_groups(self, ctx: TrainContext, groups: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        """Return the optimizer's param groups, changed if the method needs its own (a group
        may set ``lr``); called before the optimizer and its LR schedule are built, so the
        schedule covers every group. Find parameters by identity, not by group name."""
        return groups

    def configure_optimizer(self, ctx: TrainContext) -> None:
        """Read or adjust ``ctx.optimizer`` right after it is built (keep its groups)."""

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
