"""``methods.blockrep`` — block replacement config (torch-free; the method is ``blockrep.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qsearch.config import catalog
from qsearch.config.methods import MethodConfig, register_method
from qsearch.errors import ConfigError

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig


class BlockRepConfig(MethodConfig):
    """``methods.blockrep``: split granularity, branch loss weights and KD temperature."""

    granularity: Literal["stage", "block"] = "stage"
    branch_weight: float = Field(1.0, ge=0.0, le=10.0, description="a_i = b_i for all branches")
    kd_weight: float = Field(1.0, ge=0.0, description="l0: KD weight of the quantized output")
    tau: float = Field(1.0, gt=0.0)
    branch_reduction: Literal["sum", "mean"] = Field(
        "sum", description="sum the branch terms (METHODS.md) or average them over branches, "
        "which keeps the loss scale independent of the number of blocks")

    def check(self, trial: TrialConfig) -> None:
        """Reject trials that cannot build the mixed models (called at spec validation)."""
        info = catalog.model_info(trial.model)
        if info is None or not info.has_split:
            raise ConfigError(
                "methods.blockrep.enabled",
                f"model {trial.model!r} declares no block split, so block replacement cannot "
                "run on it; pass split=... to its register_model(...) or disable blockrep",
            )
        if not trial.warm_start.enabled:
            raise ConfigError(
                "methods.blockrep.enabled",
                "block replacement trains against the FP32 warm-start model; set "
                "warm_start.enabled=true or disable blockrep",
            )


register_method("blockrep", BlockRepConfig, order=20,
                handler="qsearch.methods.blockrep:BlockReplacement")
