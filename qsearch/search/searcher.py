"""Ray Tune's OptunaSearch, made to record what really happened to each trial.

The stock ``OptunaSearch.on_trial_complete`` tells Optuna COMPLETE whenever the last result
has the metrics — including for a trial the scheduler stopped at an early rung, which would
put a half-trained point on the Pareto front. :class:`QsearchOptunaSearch` classifies every
ending with :func:`classify` instead:

* the trainable's final report carries ``qsearch_done`` -> COMPLETE with the objective values;
* Tune stopped it (``done`` set by a scheduler STOP) before that -> PRUNED, epoch recorded;
* the trainer raised -> the trainable reports ``qsearch_error`` -> FAIL with that message;
* its process or node died more often than ``failure.max_failures`` allows -> FAIL with Ray's
  error (told by :meth:`fail`, once the driver callback has read the message, since Tune
  calls the searcher before the callbacks on errors). Restarts before that are not endings:
  Tune tells the searcher nothing, so Optuna hears of each trial exactly once;
* it never got to end (Ctrl-C, time limit, lost driver) -> FAIL, marked as not counting
  toward the budget (``qsearch_counted = False``).

It also writes the full TrialConfig into the Optuna trial's user attrs and hands the Optuna
trial number to the trainable, so worker, store and Optuna agree on the trial's identity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from qsearch.errors import QsearchError
from qsearch.config import StudySpec

log = logging.getLogger(__name__)
TRIAL_KEY = "_qsearch_trial"  # config key carrying the Optuna trial number to the worker


@dataclass
class Outcome:
    """How a trial ended, in Optuna's terms plus qsearch's bookkeeping."""

    state: TrialState
    detail: str
    counted: bool
    values: dict[str, float] = field(default_factory=dict)
    epochs_completed: int = 0
    error: str | None = None

    def user_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"qsearch_detail": self.detail, "qsearch_counted": self.counted,
                                 "epochs_completed": self.epochs_completed}
        if self.error is not None:
            attrs["error"] = self.error
        if self.state == TrialState.PRUNED:
            attrs["pruned_at_epoch"] = self.epochs_completed
        return attrs


def classify(result: dict[str, Any] | None, objectives: list[str]) -> Outcome:
    """Decide a trial's Optuna state from its last Tune result (see module docstring)."""
    if not result:
        return Outcome(TrialState.FAIL, "stopped before it reported", counted=False,
                       error="stopped before its first report")
    epoch = int(result.get("epoch", 0) or 0)
    values = {o: result.get(o) for o in objectives}
    if result.get("qsearch_error"):
        return Outcome(TrialState.FAIL, "error", counted=True,
                       epochs_completed=int(result.get("qsearch_epochs_completed", 0) or 0),
                       error=str(result["qsearch_error"]))
    if result.get("qsearch_done"):
        bad = [o for o, v in values.items() if v is None or not math.isfinite(float(v))]
        if bad:
            return Outcome(TrialState.FAIL, "non-finite objective", counted=True,
                           epochs_completed=epoch,
                           error=f"objective(s) {', '.join(bad)} not finite: {values}")
        return Outcome(TrialState.COMPLETE, "finished", counted=True,
                       values={o: float(v) for o, v in values.items()}, epochs_completed=epoch)
    if result.get("done"):
        return Outcome(TrialState.PRUNED, f"stopped by the scheduler at epoch {epoch}",
                       counted=True, epochs_completed=epoch)
    return Outcome(TrialState.FAIL, "interrupted", counted=False, epochs_completed=epoch,
                   error="interrupted before it finished (driver stopped)")


class QsearchOptunaSearch(OptunaSearch):
    """OptunaSearch on the study's RDB storage with truthful trial states."""

    def __init__(self, spec: StudySpec, space: dict[str, optuna.distributions.BaseDistribution],
                 storage: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler):
        super().__init__(space=space, metric=list(spec.objectives),
                         mode=["max" if d == "maximize" else "min" for d in spec.directions],
                         sampler=sampler, study_name=spec.name, storage=storage)
        self._spec = spec
        self.outcomes: dict[str, Outcome] = {}
        self.numbers: dict[str, int] = {}
        self._awaiting_error: set[str] = set()

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params = super().suggest(trial_id)
        if not isinstance(params, dict):
            return params
        ot = self._ot_trials[trial_id]
        self.numbers[trial_id] = ot.number
        try:
            ot.set_user_attr("config", self._spec.trial_config(params).model_dump(mode="json"))
        except QsearchError as e:  # the worker fails on it too, with this message
            ot.set_user_attr("config_error", str(e))
        return {**params, TRIAL_KEY: ot.number}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Multi-objective Optuna has no intermediate values; the store keeps the curves."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if error:
            self._awaiting_error.add(trial_id)  # the callback calls fail() with the message
            return
        self._tell(trial_id, classify(result, list(self._spec.objectives)))

    def fail(self, trial_id: str, message: str, epochs_completed: int = 0,
             counted: bool = True, detail: str = "error") -> Outcome | None:
        """Record a failed trial with its error message (user attr ``error``)."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return self.outcomes.get(trial_id)
        self._awaiting_error.discard(trial_id)
        return self._tell(trial_id, Outcome(TrialState.FAIL, detail, counted=counted,
                                            epochs_completed=epochs_completed, error=message))

    def open_trials(self) -> list[str]:
        """Tune trial ids that were suggested but not yet told to Optuna."""
        return [t for t in self._ot_trials if t not in self._completed_trials]

    def _tell(self, trial_id: str, outcome: Outcome) -> Outcome:
        ot = self._ot_trials[trial_id]
        for k, v in outcome.user_attrs().items():
            ot.set_user_attr(k, v)
        values = [outcome.values[o] for o in self._spec.objectives] \
            if outcome.state == TrialState.COMPLETE else None
        self._ot_study.tell(ot, values, state=outcome.state)
        self._completed_trials.add(trial_id)
        self.outcomes[trial_id] = outcome
        return outcome
