"""Multi-objective early stopping: ASHA's rungs, Pareto dominance instead of a top fraction.

ASHA on accuracy stops a small, cheap model that is a little less accurate, even when it
would sit on the front. :class:`ParetoRungScheduler` keeps ASHA's rungs (``grace_period``,
``grace_period * reduction_factor``, ... below the trial length) but at a rung stops a trial
only if some trial that reached the same rung *dominates* it on all the study's objectives,
each read as it stands at that rung: sizes and modelled costs are known from the config (the
trainer reports them every epoch), accuracy and executed costs are the rung epoch's values.
Stopped trials end PRUNED (the searcher's classification), as with ASHA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from qsearch.protocol import EPOCH


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Rung epochs: grace_period * rf^k, strictly below ``max_t`` (a full-length trial ends)."""
    out: list[int] = []
    r = float(grace_period)
    while r < max_t:
        epoch = int(round(r))
        if not out or epoch > out[-1]:
            out.append(epoch)
        r *= reduction_factor
    return out


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        if x < y:
            better = True
    return better


def dominated_at_rung(point: Sequence[float], others: Sequence[Sequence[float]],
                      directions: Sequence[str]) -> bool:
    return any(dominates(o, point, directions) for o in others)


class ParetoRungScheduler(FIFOScheduler):
    """Tune scheduler: stop a trial at a rung only when it is dominated there."""

    def __init__(self, metric_keys: list[str], directions: list[str], grace_period: int,
                 reduction_factor: float, max_t: int):
        super().__init__()
        self.metric_keys = list(metric_keys)
        self.directions = list(directions)
        self.rungs = rungs(grace_period, reduction_factor, max_t)
        #: rung epoch -> {trial id: objective values at that rung}
        self.recorded: dict[int, dict[str, list[float]]] = {r: {} for r in self.rungs}

    def decide(self, trial_id: str, result: dict[str, Any]) -> str:
        """CONTINUE or STOP for ``result`` (pure bookkeeping; also what the tests call)."""
        epoch = int(result.get(EPOCH, 0) or 0)
        if epoch not in self.recorded:
            return TrialScheduler.CONTINUE
        values = [result.get(k) for k in self.metric_keys]
        if any(not isinstance(v, (int, float)) or math.isnan(float(v)) for v in values):
            return TrialScheduler.CONTINUE  # an error result: the trainable ends it itself
        point = [float(v) for v in values]
        here = self.recorded[epoch]
        others = [v for t, v in here.items() if t != trial_id]
        here[trial_id] = point
        if dominated_at_rung(point, others, self.directions):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.decide(trial.trial_id, result)

    def debug_string(self) -> str:
        return f"ParetoRungScheduler: rungs {self.rungs}"
