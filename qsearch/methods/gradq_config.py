"""``methods.gradq`` — gradient quantization config (torch-free; the method is in ``gradq.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from qsearch.config.base import FP32_BITS
from qsearch.config.methods import MethodConfig, register_method
from qsearch.errors import ConfigError

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig


class HypernetConfig(MethodConfig):
    """``methods.gradq.hypernet``: MetaQuant-style meta network whose output is a committed
    weight update (METHODS.md §4)."""

    hidden: int = Field(8, ge=1, le=256)
    lr: float = Field(1e-3, gt=0.0)


class GradQConfig(MethodConfig):
    """``methods.gradq``: gradient bit-width (32 = off) and quantizer granularity."""

    bits: int = 8
    granularity: Literal["tensor", "sample/channel"] = "tensor"
    first_last_bits: int = 8
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)

    @field_validator("bits", "first_last_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == FP32_BITS):
            raise ValueError("must be 2..8 or 32 (32 = full precision)")
        return v

    def check(self, trial: TrialConfig) -> None:
        if self.hypernet.enabled and self.bits >= FP32_BITS and self.first_last_bits >= FP32_BITS:
            raise ConfigError(
                "methods.gradq.hypernet.enabled",
                "the hypernetwork compensates quantized gradients, but bits=32 and "
                "first_last_bits=32 leave every gradient FP32; lower methods.gradq.bits or "
                "disable methods.gradq.hypernet",
            )


register_method("gradq", GradQConfig, order=50, handler="qsearch.methods.gradq:GradQ")
