"""``methods.csq`` — the CSQ config section (torch-free; the method is in ``csq.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, field_validator, model_validator

from qsearch.config.methods import MethodConfig, register_method
from qsearch.errors import ConfigError

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig

MIN_BITS = 2  # the smallest weight width a trial config accepts


class CSQConfig(MethodConfig):
    """``methods.csq``: budget (average bits or MB), bit planes and the gate schedule."""

    sets_precision: ClassVar[bool] = True  # stage 1 chooses the layers' weight bits

    target_bits: float | None = Field(3.0, ge=1.0, le=8.0)
    target_mb: float | None = Field(None, gt=0.0)
    planes: int = 8
    lam: float = Field(5e-3, gt=0.0, description="budget regularizer weight lambda")
    beta_final: float = Field(200.0, gt=1.0)
    ticket_frac: float = Field(0.9, gt=0.0, le=1.0)
    epochs_frac: float = Field(0.5, gt=0.0, lt=1.0, description="share of epochs for stage 1")
    size_aware: bool = True
    integral_gain: float = Field(
        0.5, ge=0.0, description="integral action of the budget loop per step (0 = reference)")
    gate_lr: float = Field(0.05, gt=0.0, description="learning rate of the gate logits m")
    bit_lr: float = Field(0.05, gt=0.0, description="learning rate of the bit logits P, N")
    enforce_budget: bool = Field(True, description="project the hard pattern onto the budget")
    budget_tol: float = Field(0.02, ge=0.0, lt=0.5, description="relative size tolerance")
    search_edges: bool = Field(False, description="also search the first/last layers")
    carry_weights: bool = Field(True, description="stage 2 starts from the stage-1 weights")

    @field_validator("planes")
    @classmethod
    def _planes(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError("must be between 2 and 8 bit planes (usually 6 or 8)")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> CSQConfig:
        if self.target_mb is not None and self.target_bits is not None and self.enabled:
            # target_mb given explicitly wins over the default target_bits.
            object.__setattr__(self, "target_bits", None)
        return self

    def check(self, trial: TrialConfig) -> None:
        if trial.epochs < 2:
            raise ConfigError("epochs", "CSQ needs at least 2 epochs (stage 1 search, stage 2 QAT)")
        if self.target_bits is not None and not MIN_BITS <= self.target_bits <= self.planes:
            raise ConfigError("methods.csq.target_bits",
                              f"must lie in [{MIN_BITS}, planes={self.planes}] average bits")


register_method("csq", CSQConfig, order=10, handler="qsearch.methods.csq:CSQ")
