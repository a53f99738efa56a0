"""Map a StudySpec to Optuna distributions, an Optuna sampler and a Ray Tune scheduler."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from qsearch.errors import ConfigError
from qsearch.config import CategoricalDist, FloatDist, IntDist, StudySpec
from qsearch.config.space import check_asha


def optuna_space(spec: StudySpec) -> dict[str, BaseDistribution]:
    """Searched (non-fixed) dimensions, keyed by their dotted TrialConfig path."""
    out: dict[str, BaseDistribution] = {}
    for path, d in spec.searched().items():
        if isinstance(d, FloatDist):
            out[path] = FloatDistribution(d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, IntDist):
            out[path] = IntDistribution(d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, CategoricalDist):
            out[path] = CategoricalDistribution(d.choices)
    return out


def build_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. On resume the seed is shifted by the number of trials already in
    the study, so a resumed random/TPE start-up does not replay the first run's points."""
    seed = None if spec.sampler.seed is None else spec.sampler.seed + seed_offset
    opts: dict[str, Any] = dict(spec.sampler.options)
    classes = {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler,
               "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler}
    cls = classes[spec.sampler.type]
    try:
        return cls(seed=seed, **opts)
    except TypeError as e:
        raise ConfigError("sampler.options", f"not accepted by {cls.__name__}: {e}") from None


def build_scheduler(spec: StudySpec) -> Any:
    """FIFO (run everything to the end), ASHA on one metric, or Pareto rungs over epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from qsearch.config.objectives import get_objective
    from qsearch.search.pareto_rungs import ParetoRungScheduler

    sch = spec.scheduler
    if sch.type == "none":
        return FIFOScheduler()
    max_t = spec.max_epochs()
    check_asha(sch.grace_period, max_t)
    if sch.type == "pareto":
        return ParetoRungScheduler([get_objective(o).metric_key for o in spec.objectives],
                                   list(spec.directions), sch.grace_period,
                                   sch.reduction_factor, max_t)
    return ASHAScheduler(time_attr="epoch", metric=get_objective(sch.metric).metric_key,
                         mode="max", max_t=max_t, grace_period=sch.grace_period,
                         reduction_factor=sch.reduction_factor)
