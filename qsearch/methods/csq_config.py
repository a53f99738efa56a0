"""``methods.csq`` — the CSQ config section (torch-free; the method is in ``csq.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from qsearch.config.methods import MethodConfig, register_method
from qsearch.errors import ConfigError

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig

MIN_BITS = 2  # the smallest weight width a trial config accepts
MAX_BITS = 8  # the widest quantized weight a trial config accepts
SIGN_BITS = 1  # a layer with k active bit planes is k + 1 bits wide (sign-magnitude)


class CSQConfig(MethodConfig):
    """``methods.csq``: budget (average bits or MB), bit planes and the gate schedule."""

    sets_precision: ClassVar[bool] = True  # stage 1 chooses the layers' weight bits

    target_bits: float | None = Field(3.0, ge=1.0, le=8.0)
    target_mb: float | None = Field(None, gt=0.0)
    planes: int = Field(6, description="magnitude bit planes n; a layer is at most n+1 bits")
    lam: float = Field(0.05, ge=0.0, description="budget regularizer weight lambda")
    beta_final: float = Field(200.0, gt=1.0)
    ticket_frac: float = Field(0.6, gt=0.0, le=1.0)
    epochs_frac: float = Field(0.5, gt=0.0, lt=1.0, description="share of epochs for stage 1")
    size_aware: bool = True
    integral_gain: float = Field(
        0.1, ge=0.0, description="budget price step: I += gain * (rho - rho*) every step")
    gate_lr: float = Field(0.005, gt=0.0, description="step (sign) or LR (sgd) of the gate logits")
    bit_lr: float = Field(0.05, gt=0.0, description="learning rate of the bit logits P, N")
    enforce_budget: bool = Field(
        False, description="fallback: project the hard pattern onto the budget if it misses")
    budget_tol: float = Field(0.05, ge=0.0, lt=0.5, description="relative size tolerance")
    gate_step: Literal["sign", "sgd"] = Field(
        "sign", description="gate update: sign of the gradient (default) or the trial's SGD")
    proportional: bool = Field(
        False, description="add the reference's proportional term (rho - rho*) to the price")
    gate_ramp: float = Field(0.013, ge=0.0, description="initial gate logit step per plane")
    ticket_wait: float = Field(
        0.6, ge=0.0, le=1.0,
        description="share of the time after ticket_frac the ticket may wait for an in-band "
                    "pattern")
    search_edges: bool = Field(False, description="also search the first/last layers")
    carry_weights: bool = Field(True, description="stage 2 starts from the stage-1 weights")

    @field_validator("planes")
    @classmethod
    def _planes(cls, v: int) -> int:
        if not MIN_BITS - SIGN_BITS <= v <= MAX_BITS - SIGN_BITS:
            raise ValueError(f"must be between {MIN_BITS - SIGN_BITS} and {MAX_BITS - SIGN_BITS} "
                             "magnitude bit planes (a layer with k planes is k+1 bits; usually "
                             "5 to 7)")
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
        top = self.planes + SIGN_BITS
        if self.target_bits is not None and not MIN_BITS <= self.target_bits <= top:
            raise ConfigError("methods.csq.target_bits",
                              f"must lie in [{MIN_BITS}, planes+1={top}] average bits "
                              f"(planes={self.planes} magnitude planes plus the sign bit)")


register_method("csq", CSQConfig, order=10, handler="qsearch.methods.csq:CSQ")
