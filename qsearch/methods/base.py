"""The method plug-in interface of the shared trainer.

A QAT technique is a :class:`Method` subclass registered under its config name with
:func:`register_method`. The trainer calls the hooks below in this order, for every enabled
method in the fixed order of :data:`METHOD_ORDER`::

    precision_stage   once, before LSQ conversion (CSQ learns per-layer bits here)
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
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from qsearch.train.context import TrainContext


class MethodConfig(BaseModel):
    """Base of each ``methods.<name>`` section: off by default, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False


class Method(ABC):  # noqa: B024 - every hook has a do-nothing default on purpose
    """One QAT technique plugged into the trainer. Override only the hooks you need."""

    name: ClassVar[str]
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


METHOD_ORDER: tuple[str, ...] = ("csq", "blockrep", "lts", "tr", "gradq")
_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a Method under its ``methods.<name>`` config key."""

    def deco(cls: type[Method]) -> type[Method]:
        if name not in METHOD_ORDER:
            raise ValueError(f"method {name!r} must be listed in METHOD_ORDER")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def method_class(name: str) -> type[Method]:
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    return [n for n in METHOD_ORDER if n in _REGISTRY]
