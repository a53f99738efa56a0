"""The study's searcher: a Ray Tune ``Searcher`` over Optuna's public ask/tell.

It wraps an ordinary :class:`optuna.Study` (on the study's RDB storage, with the spec's
sampler): :meth:`StudySearcher.suggest` asks Optuna for a trial, builds the finished
TrialConfig once and hands both to Tune (:class:`~qsearch.protocol.TrialAssignment`); when
Tune reports the trial's end, the searcher classifies it with :func:`classify` and tells
Optuna — exactly once per trial:

* the trainable's final report carries ``DONE`` -> COMPLETE with the objective values;
* Tune stopped it (``done`` set by a scheduler STOP) before that -> PRUNED, epoch recorded;
* the trainer raised -> the trainable reports ``ERROR`` -> FAIL with that message;
* its process or node died more often than ``failure.max_failures`` allows -> FAIL with Ray's
  error (told by :meth:`fail`, once the driver callback has read the message, since Tune
  calls the searcher before the callbacks on errors). Restarts before that are not endings:
  Tune tells the searcher nothing, so Optuna hears of each trial exactly once;
* it never got to end (Ctrl-C, time limit, lost driver) -> FAIL, marked as not counting
  toward the budget (``qsearch_counted = False``).

It also writes the full TrialConfig into the Optuna trial's user attrs and hands the Optuna
trial number to the trainable, so worker, store and Optuna agree on the trial's identity.
(Ray's own ``OptunaSearch`` tells Optuna COMPLETE whenever the last result has the metrics —
also for a trial the scheduler stopped early — and its state is private; hence our own.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from qsearch import protocol as P
from qsearch.config import StudySpec
from qsearch.config.objectives import get_objective
from qsearch.errors import QsearchError

log = logging.getLogger(__name__)


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
        attrs: dict[str, Any] = {P.ATTR_DETAIL: self.detail, P.ATTR_COUNTED: self.counted,
                                 P.ATTR_EPOCHS_COMPLETED: self.epochs_completed}
        if self.error is not None:
            attrs[P.ATTR_ERROR] = self.error
        if self.state == TrialState.PRUNED:
            attrs[P.ATTR_PRUNED_AT] = self.epochs_completed
        return attrs


def classify(result: dict[str, Any] | None, objectives: list[str]) -> Outcome:
    """Decide a trial's Optuna state from its last Tune result (see module docstring)."""
    if not result:
        return Outcome(TrialState.FAIL, "stopped before it reported", counted=False,
                       error="stopped before its first report")
    epoch = int(result.get(P.EPOCH, 0) or 0)
    values = {o: result.get(get_objective(o).metric_key) for o in objectives}
    if result.get(P.ERROR):
        return Outcome(TrialState.FAIL, "error", counted=True,
                       epochs_completed=int(result.get(P.EPOCHS_COMPLETED, 0) or 0),
                       error=str(result[P.ERROR]))
    if result.get(P.DONE):
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


class StudySearcher(Searcher):
    """Ray Tune searcher over an Optuna study's ask/tell (see the module docstring).

    Tune calls :meth:`suggest` for each new trial and :meth:`on_trial_complete` once it ends;
    errors (a dead worker past its retries) are told by :meth:`fail`, which the driver's
    callback calls with Ray's error message.
    """

    def __init__(self, spec: StudySpec, study: optuna.Study,
                 storage: optuna.storages.BaseStorage,
                 space: dict[str, optuna.distributions.BaseDistribution]):
        super().__init__(metric=None, mode=None)
        self.spec = spec
        self.study = study
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.space = space
        self.objectives = list(spec.objectives)
        self.outcomes: dict[str, Outcome] = {}
        self.numbers: dict[str, int] = {}
        self._trials: dict[str, optuna.Trial] = {}
        self._told: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        """The space comes from the study spec, not from Tune's ``param_space``."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        ot = self.study.ask(self.space)
        self._trials[trial_id] = ot
        self.numbers[trial_id] = ot.number
        params = dict(ot.params)
        try:
            config = self.spec.trial_config(params).model_dump(mode="json")
            ot.set_user_attr(P.ATTR_CONFIG, config)
            return P.TrialAssignment(ot.number, params, config).to_tune()
        except QsearchError as e:  # the worker reports it as the trial's error
            ot.set_user_attr(P.ATTR_CONFIG_ERROR, str(e))
            return P.TrialAssignment(ot.number, params, None, config_error=str(e)).to_tune()

    def optuna_trial(self, trial_id: str) -> optuna.Trial | None:
        """The Optuna trial behind a Tune trial id (None for one this searcher did not ask)."""
        return self._trials.get(trial_id)

    def optuna_trial_id(self, trial_id: str) -> int | None:
        """Optuna's storage id of the trial (what its tables key on), via the storage API."""
        number = self.numbers.get(trial_id)
        if number is None:
            return None
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Multi-objective Optuna has no intermediate values; the store keeps the curves."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._told or trial_id not in self._trials:
            return
        if error:
            return  # the callback calls fail() with the message
        self._tell(trial_id, classify(result, self.objectives))

    def fail(self, trial_id: str, message: str, epochs_completed: int = 0,
             counted: bool = True, detail: str = "error") -> Outcome | None:
        """Record a failed trial with its error message (user attr ``error``)."""
        if trial_id in self._told or trial_id not in self._trials:
            return self.outcomes.get(trial_id)
        return self._tell(trial_id, Outcome(TrialState.FAIL, detail, counted=counted,
                                            epochs_completed=epochs_completed, error=message))

    def open_trials(self) -> list[str]:
        """Tune trial ids that were suggested but not yet told to Optuna."""
        return [t for t in self._trials if t not in self._told]

    def _tell(self, trial_id: str, outcome: Outcome) -> Outcome:
        ot = self._trials[trial_id]
        for k, v in outcome.user_attrs().items():
            ot.set_user_attr(k, v)
        values = [outcome.values[o] for o in self.objectives] \
            if outcome.state == TrialState.COMPLETE else None
        self.study.tell(ot, values, state=outcome.state)
        self._told.add(trial_id)
        self.outcomes[trial_id] = outcome
        return outcome
