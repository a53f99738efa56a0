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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from qsearch import protocol as P
from qsearch.config import StudySpec
from qsearch.config.objectives import get_objective
from qsearch.errors import QsearchError, StorageError

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
    #: False when a constraint is violated: stored, told to the sampler, never on the front.
    feasible: bool = True
    #: The earlier trial whose result this one reuses (same config; not trained again).
    reused_from: int | None = None
    #: Optuna constraint values (<= 0 feasible), by constraint name.
    constraints: dict[str, float] = field(default_factory=dict)

    def user_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {P.ATTR_DETAIL: self.detail, P.ATTR_COUNTED: self.counted,
                                 P.ATTR_EPOCHS_COMPLETED: self.epochs_completed,
                                 P.ATTR_FEASIBLE: self.feasible}
        if self.reused_from is not None:
            attrs[P.ATTR_REUSED_FROM] = self.reused_from
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


#: Consecutive configs skipped before training (infeasible or duplicate) after which the
#: searcher gives up: the constraints leave (almost) nothing of the space.
MAX_SKIPPED_IN_A_ROW = 200

#: Called for trials the searcher ends itself, without Tune (skipped, reused):
#: ``(number, outcome, params, config)``.
Recorder = Callable[[int, "Outcome", dict[str, Any], dict[str, Any] | None], None]


class StudySearcher(Searcher):
    """Ray Tune searcher over an Optuna study's ask/tell (see the module docstring).

    Tune calls :meth:`suggest` for each new trial and :meth:`on_trial_complete` once it ends;
    errors (a dead worker past its retries) are told by :meth:`fail`, which the driver's
    callback calls with Ray's error message.

    Before a config goes to Tune, two checks spare a training run:

    * a config identical to one already COMPLETE is not trained again: the new Optuna trial
      is told the earlier trial's values, recorded as reused (``reused_from``), and counts
      toward the budget (the budget is a number of sampler proposals);
    * a constraint on a value the config alone fixes (``size_mb``) is checked by ``known``;
      an infeasible config is told FAIL with its constraint values, recorded as skipped, and
      does not count.
    """

    def __init__(self, spec: StudySpec, study: optuna.Study,
                 storage: optuna.storages.BaseStorage,
                 space: dict[str, optuna.distributions.BaseDistribution], *,
                 budget: int | None = None,
                 known: Callable[[Any], dict[str, float]] | None = None,
                 record: Recorder | None = None):
        super().__init__(metric=None, mode=None)
        self.spec = spec
        self.study = study
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.space = space
        self.objectives = list(spec.objectives)
        self.budget = budget
        self.known = known
        self.record = record or (lambda *_: None)
        #: Set by the driver: once its ``requested`` is true, endings are interruptions.
        self.interrupt: Any = None
        #: Why :meth:`suggest` stopped suggesting (raised by the driver's callback).
        self.failure: Exception | None = None
        self.outcomes: dict[str, Outcome] = {}
        self.numbers: dict[str, int] = {}
        self.proposed = 0  # configs handed to Tune or reused, toward ``budget``
        self.reused = 0
        self.skipped = 0
        self._trials: dict[str, optuna.Trial] = {}
        self._told: set[str] = set()
        self._keys: dict[str, str] = {}  # Tune trial id -> config key
        self._complete: dict[str, tuple[int, dict[str, float], dict[str, float]]] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            key = t.user_attrs.get(P.ATTR_CONFIG_KEY)
            if key and t.values is not None and t.user_attrs.get(P.ATTR_REUSED_FROM) is None:
                self._complete.setdefault(key, (t.number, dict(zip(self.objectives, t.values)),
                                                {}))

    # Tune pickles its searcher with the experiment state (and may checkpoint it). A study
    # resumes from its Optuna storage, never from Tune's snapshot, and the live study,
    # storage and sampler (some hold locks) do not travel: only bookkeeping is kept.
    def __getstate__(self) -> dict[str, Any]:
        return {"objectives": self.objectives, "proposed": self.proposed,
                "reused": self.reused, "skipped": self.skipped, "failure": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study's state lives in its Optuna storage."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a relaunch reloads the study from its Optuna storage."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        """The space comes from the study spec, not from Tune's ``param_space``."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """The next trial's assignment, or ``FINISHED`` at the budget and after a failure.

        A failure here (the database down past every retry, a space the constraints leave
        empty) is kept in :attr:`failure` rather than raised: raised inside Tune's loop it
        would end the run with Tune's traceback. The driver's callback raises it from
        ``on_step_begin`` while trials run, and the driver after ``Tuner.fit`` returns; the
        study stops with one line. ``FINISHED``, not None: with no trial running, Tune waits
        for a searcher that returns None, asking again every second for up to 10 minutes
        without a loop step in which the callback could stop it."""
        if self.failure is not None:
            return Searcher.FINISHED
        try:
            return self._suggest(trial_id)
        except QsearchError as e:
            self.failure = e
        except Exception as e:  # noqa: BLE001 - Optuna's storage, past the store's retries
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failure = StorageError(f"the Optuna storage failed while asking for a trial: "
                                        f"{first}")
            self.failure.__cause__ = e
        log.error("stopping the study: %s", self.failure)
        return Searcher.FINISHED

    def _suggest(self, trial_id: str) -> dict[str, Any] | None:
        for _ in range(MAX_SKIPPED_IN_A_ROW):
            if self.budget is not None and self.proposed >= self.budget:
                return Searcher.FINISHED
            ot = self.study.ask(self.space)
            params = dict(ot.params)
            try:
                cfg = self.spec.trial_config(params)
            except QsearchError as e:  # the worker reports it as the trial's error
                ot.set_user_attr(P.ATTR_CONFIG_ERROR, str(e))
                return self._hand_to_tune(trial_id, ot, P.TrialAssignment(
                    ot.number, params, None, config_error=str(e)))
            config = cfg.model_dump(mode="json")
            key = P.config_key(config)
            ot.set_user_attr(P.ATTR_CONFIG, config)
            ot.set_user_attr(P.ATTR_CONFIG_KEY, key)
            if key in self._complete:
                self._reuse(ot, params, config, *self._complete[key])
                continue
            violations = self._known_violations(cfg)
            if any(v > 0 for v in violations.values()):
                self._skip(ot, params, config, violations)
                continue
            self._keys[trial_id] = key
            return self._hand_to_tune(trial_id, ot, P.TrialAssignment(ot.number, params, config))
        raise QsearchError(f"{MAX_SKIPPED_IN_A_ROW} configs in a row were infeasible or already "
                           "trained; loosen the constraints or widen the search space")

    # ------------------------------------------------------------------ before training
    def _hand_to_tune(self, trial_id: str, ot: optuna.Trial,
                      job: P.TrialAssignment) -> dict[str, Any]:
        self._trials[trial_id] = ot
        self.numbers[trial_id] = ot.number
        self.proposed += 1
        return job.to_tune()

    def _known_violations(self, cfg: Any) -> dict[str, float]:
        from qsearch.config.objectives import get_objective

        wanted = {n: b for n, b in self.spec.constraints.items()
                  if get_objective(n).known_before_training}
        if not wanted or self.known is None:
            return {}
        values = self.known(cfg)
        return {n: b.violation(values[get_objective(n).metric_key])
                for n, b in wanted.items() if get_objective(n).metric_key in values}

    def _skip(self, ot: optuna.Trial, params: dict[str, Any], config: dict[str, Any],
              violations: dict[str, float]) -> None:
        why = ", ".join(f"{n} over its bound by {v:.4g}" for n, v in violations.items() if v > 0)
        outcome = Outcome(TrialState.FAIL, f"infeasible before training ({why}); not trained",
                          counted=False, feasible=False, constraints=violations,
                          error=f"infeasible: {why}")
        self._finish(ot, outcome)
        self.skipped += 1
        self.record(ot.number, outcome, params, config)

    def _reuse(self, ot: optuna.Trial, params: dict[str, Any], config: dict[str, Any],
               source: int, values: dict[str, float], constraints: dict[str, float]) -> None:
        feasible = all(v <= 0 for v in constraints.values())
        outcome = Outcome(TrialState.COMPLETE, f"same config as trial {source}; result reused",
                          counted=True, values=dict(values), reused_from=source,
                          feasible=feasible, constraints=dict(constraints))
        self._finish(ot, outcome)
        self.proposed += 1
        self.reused += 1
        self.record(ot.number, outcome, params, config)

    # ------------------------------------------------------------------ Tune's side
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
        if self.failure is not None:
            # The storage failed and the study is stopping: Tune ends its trials now, and
            # telling a database that is down would only raise inside Tune's clean-up. The
            # next launch closes them (reap_lost_trials).
            return
        if error:
            return  # the callback calls fail() with the message
        outcome = classify(result, self.objectives)
        if self.interrupt is not None and self.interrupt.requested and \
                outcome.state != TrialState.COMPLETE:
            outcome = Outcome(TrialState.FAIL, "interrupted", counted=False,
                              epochs_completed=outcome.epochs_completed,
                              error="interrupted (Ctrl-C) before it finished; the next launch "
                                    "runs it again")
        if outcome.state == TrialState.COMPLETE and self.spec.constraints:
            outcome = self._with_constraints(outcome, result or {})
        self._tell(trial_id, outcome)
        key = self._keys.get(trial_id)
        if outcome.state == TrialState.COMPLETE and key:
            self._complete.setdefault(key, (self.numbers[trial_id], dict(outcome.values),
                                            dict(outcome.constraints)))

    def _with_constraints(self, outcome: Outcome, result: dict[str, Any]) -> Outcome:
        from qsearch.config.objectives import get_objective

        violations: dict[str, float] = {}
        for name, bound in self.spec.constraints.items():
            value = result.get(get_objective(name).metric_key)
            if isinstance(value, (int, float)):
                violations[name] = bound.violation(float(value))
        bad = [f"{n} over its bound by {v:.4g}" for n, v in violations.items() if v > 0]
        outcome.constraints = violations
        if bad:
            outcome.feasible = False
            outcome.detail = f"finished; infeasible ({', '.join(bad)})"
        return outcome

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

    def _finish(self, ot: optuna.Trial, outcome: Outcome) -> None:
        for k, v in outcome.user_attrs().items():
            ot.set_user_attr(k, v)
        for name, v in outcome.constraints.items():
            ot.set_constraint(name, v)
        values = [outcome.values[o] for o in self.objectives] \
            if outcome.state == TrialState.COMPLETE else None
        self.study.tell(ot, values, state=outcome.state)

    def _tell(self, trial_id: str, outcome: Outcome) -> Outcome:
        self._finish(self._trials[trial_id], outcome)
        self._told.add(trial_id)
        self.outcomes[trial_id] = outcome
        return outcome
