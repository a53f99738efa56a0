"""``methods.lts`` — the LTS config section (torch-free; the method is in ``lts.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qsearch.config.methods import MethodConfig, register_method
from qsearch.errors import ConfigError

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig


def require_quantized_weights(trial: TrialConfig, name: str) -> None:
    """LTS and TR work on the LSQ weight grid: at least one layer must have quantized weights
    (or a precision stage must be choosing them)."""
    if not trial.has_quantized_weights():
        raise ConfigError(
            f"methods.{name}.enabled",
            "needs quantized weights (every layer has w_bits=32); set w_bits below 32 or "
            f"disable methods.{name}",
        )


class LTSConfig(MethodConfig):
    """``methods.lts``: threshold schedule and EMA of the distance to the nearest level."""

    mode: Literal["linear-growth", "sine-growth", "fixing"] = "linear-growth"
    rate: float = Field(0.1, gt=0.0, le=1.0, description="threshold for mode=fixing (levels)")
    warmup_frac: float = Field(0.2, ge=0.0, lt=1.0, description="T_w as a fraction of steps")
    momentum: float = Field(0.99, gt=0.0, lt=1.0, description="EMA momentum m")
    #: ``element``: each weight freezes on its own (the paper's rule); the backward skips only
    #: output channels that happen to be frozen whole. ``channel``: an output channel freezes
    #: as a unit when the ``channel_reduce`` (mean or max) of its elements' EMA distances is
    #: <= theta, so every frozen weight's dW row really is left out of the GEMM.
    granularity: Literal["element", "channel"] = "element"
    channel_reduce: Literal["mean", "max"] = "mean"

    def check(self, trial: TrialConfig) -> None:
        require_quantized_weights(trial, "lts")


register_method("lts", LTSConfig, order=30, handler="qsearch.methods.lts:LTS")
