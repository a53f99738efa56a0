"""``methods.tr`` — the TR/TALR config section (torch-free; the method is in ``tr.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qsearch.config.methods import MethodConfig, register_method
from qsearch.errors import ConfigError
from qsearch.methods.lts_config import require_quantized_weights

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig


class TRConfig(MethodConfig):
    """``methods.tr``: target transition-rate schedule and the TALR recurrence."""

    r0: float = Field(0.005, gt=0.0, le=1.0, description="initial target transition rate R_0")
    #: 0.9, not the paper's 0.99: the controller's memory is ~1/(1-m) steps, and at 0.99 it
    #: cannot follow the schedule in runs of a few hundred steps (digits, 6 epochs: 2.4x the
    #: target over the second half; 0.9: 1.2x). Raise it for long runs.
    momentum: float = Field(0.9, gt=0.0, lt=1.0, description="TALR EMA momentum m")
    lr_scale: float = Field(1.0, gt=0.0, description="alpha = lr_scale * trial lr")
    schedule: Literal["cosine", "linear", "step"] = "cosine"
    scope: Literal["layer", "global"] = "layer"
    u_min: float = Field(1e-3, gt=0.0, description="lower clamp of the TALR factor U")
    u_max: float = Field(1e3, gt=0.0, description="upper clamp of the TALR factor U")

    def check(self, trial: TrialConfig) -> None:
        require_quantized_weights(trial, "tr")
        if self.u_min >= self.u_max:
            raise ConfigError("methods.tr.u_min",
                              f"must be below u_max={self.u_max} (got {self.u_min})")
        if not self.u_min <= 1.0 <= self.u_max:
            raise ConfigError("methods.tr.u_max", "the clamp [u_min, u_max] must contain U_0 = 1")


register_method("tr", TRConfig, order=40, handler="qsearch.methods.tr:TR")
