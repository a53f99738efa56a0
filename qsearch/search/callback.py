"""The driver's Tune callback: the one place trial events become store rows.

Tune calls the searcher before the callbacks, so by the time :class:`StoreCallback` sees a
trial end, :class:`~qsearch.search.searcher.StudySearcher` has told Optuna; the
callback then writes the same outcome to qsearch's tables, the per-layer records, and a new
Pareto snapshot when a trial COMPLETEs. On errors the order is reversed for the message:
the callback reads it from the trial and hands it to the searcher (:meth:`fail`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.tune import Callback

from qsearch import protocol as P
from qsearch.config import StudySpec
from qsearch.config.objectives import objectives as registered_objectives
from qsearch.search.front import update_snapshot
from qsearch.search.searcher import Outcome, StudySearcher
from qsearch.store import Store

log = logging.getLogger(__name__)

#: Keys Tune adds to every result; everything else came from the trainer.
_TUNE_KEYS = frozenset({
    "config", "trial_id", "experiment_tag", "date", "timestamp", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "training_iteration", "done", "checkpoint_dir_name",
    "should_checkpoint",
})


def trial_error_message(trial: Any) -> str:
    """One line: the trainable's TrialError message, or the last line of Ray's error."""
    path = getattr(trial, "pickled_error_file", None)
    if path and Path(path).exists():
        try:
            import cloudpickle

            with open(path, "rb") as f:
                exc = cloudpickle.load(f)
            cause = getattr(exc, "cause", None)
            if cause is not None and str(cause):
                return str(cause).strip().splitlines()[-1]
            text = str(exc).strip()
            if text:
                return text.splitlines()[-1]
        except Exception:  # noqa: BLE001 - fall back to the text file
            pass
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return "trial failed (no error message recorded)"


def _deferring_errors(hook: Callable[..., None]) -> Callable[..., None]:
    """A trial hook whose failure (the database still down after every retry) is kept for
    :meth:`StoreCallback.on_step_begin`, which stops the study with it.

    Raised here, Tune would treat it as the *trial's* failure: one raised while a trial ends
    makes Tune restart a trial that Optuna has already been told about, and the sampler and
    the store would disagree about it."""

    @functools.wraps(hook)
    def guarded(self: StoreCallback, *args: Any, **kwargs: Any) -> None:
        if self.failure is not None or getattr(self.searcher, "failure", None) is not None:
            return  # the study is stopping; the next launch reconciles the open trials
        try:
            hook(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised by on_step_begin
            log.error("recording a trial event failed; stopping the study: %s", e)
            self.failure = e

    return guarded


class StoreCallback(Callback):
    def __init__(self, store: Store, study_id: int, spec: StudySpec,
                 searcher: StudySearcher, on_event: Callable[[str, int, dict], None] | None = None):
        self.store, self.study_id, self.spec, self.searcher = store, study_id, spec, searcher
        self.on_event = on_event or (lambda *_: None)
        self.max_epochs = spec.max_epochs()
        self._history: dict[str, list[dict[str, Any]]] = {}  # Tune trial id -> attempts
        self.failure: Exception | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its run config (for Tune-level restore, which qsearch does not use:
        a study resumes from its Optuna storage); the live DB handle does not travel."""
        return {"study_id": self.study_id, "max_epochs": self.max_epochs, "_history": {},
                "failure": None}

    # -------------------------------------------------------------- helpers
    def _record_placement(self, trial: Any, number: int, encoded: Any) -> None:
        """Store where the trial's current attempt runs, once per attempt (an attempt is a
        new worker process, so its pid differs from the previous one's)."""
        if not encoded:
            return
        where = json.loads(encoded)
        history = self._history.setdefault(trial.trial_id, [])
        if history and history[-1] == where:
            return
        history.append(where)
        self.store.set_placement(self.study_id, number, where)
        ot = self.searcher.optuna_trial(trial.trial_id)
        if ot is not None:
            ot.set_user_attr(P.ATTR_PLACEMENTS, history)  # one entry per attempt

    @staticmethod
    def _number(trial: Any) -> int | None:
        job = P.TrialAssignment.from_tune(trial.config or {})
        return job.number if job is not None else None

    def _record_end(self, trial: Any, number: int, outcome: Outcome) -> None:
        last = dict(trial.last_result or {})
        done = outcome.state == TrialState.COMPLETE
        # Every registered objective the trial measured is kept, optimized or not:
        # dashboards can re-draw the front on any of them.
        values = None
        if done:
            values = {o.name: last[o.metric_key] for o in registered_objectives()
                      if isinstance(last.get(o.metric_key), (int, float))}
            values.update(outcome.values)
            if isinstance(last.get("bops"), (int, float)):
                values.setdefault("bops", last["bops"])
        self.store.trial_finished(
            self.study_id, number, state=outcome.state.name, detail=outcome.detail,
            counted=outcome.counted, values=values,
            epochs_completed=outcome.epochs_completed, error=outcome.error,
            layers=last.get(P.LAYERS) if done else None,
            weights_path=last.get(P.WEIGHTS) if done else None,
            feasible=outcome.feasible if outcome.constraints else None)
        if done:
            update_snapshot(self.store, self.study_id, list(self.spec.objectives),
                            list(self.spec.directions), trigger_trial=number,
                            reference=dict(self.spec.reference_point) or None,
                            prune_weights=self.spec.artifacts.keep == "pareto")
        self.on_event("end", number, {"state": outcome.state.name, **outcome.values,
                                      "epoch": outcome.epochs_completed, "error": outcome.error,
                                      "feasible": outcome.feasible})

    def record_outside_tune(self, number: int, outcome: Outcome, params: dict[str, Any],
                            config: dict[str, Any] | None) -> None:
        """A trial the searcher ended before Tune saw it (infeasible before training, or a
        repeat of a finished config whose result is reused): one row, already finished."""
        self.store.trial_started(self.study_id, number, optuna_trial_id=None, params=params,
                                 config=config, max_epochs=self.max_epochs)
        done = outcome.state == TrialState.COMPLETE
        self.store.trial_finished(
            self.study_id, number, state=outcome.state.name, detail=outcome.detail,
            counted=outcome.counted, values=dict(outcome.values) if done else None,
            epochs_completed=0, error=outcome.error,
            feasible=outcome.feasible if outcome.constraints else None,
            reused_from=outcome.reused_from)
        self.on_event("end", number, {"state": outcome.state.name, **outcome.values,
                                      "epoch": 0, "error": outcome.error or outcome.detail,
                                      "feasible": outcome.feasible,
                                      "reused_from": outcome.reused_from})

    # -------------------------------------------------------------- Tune hooks
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Tune's loop step, outside any trial: a recording failure stops the study here
        (the driver then closes the open trials and releases its lease)."""
        failure = self.failure or getattr(self.searcher, "failure", None)
        if failure is not None:
            raise failure

    @_deferring_errors
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        number = self._number(trial)
        if number is None:
            return
        job = P.TrialAssignment.from_tune(trial.config)
        self.store.trial_started(self.study_id, number,
                                 optuna_trial_id=self.searcher.optuna_trial_id(trial.trial_id),
                                 params=job.params, config=job.config,
                                 max_epochs=self.max_epochs)
        self.on_event("start", number, {"params": job.params})

    @_deferring_errors
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        number = self._number(trial)
        if number is None:
            return
        self._record_placement(trial, number, result.get(P.PLACEMENT))
        if P.EPOCH not in result:
            return
        metrics = P.trainer_metrics(result, _TUNE_KEYS)
        self.store.record_epoch(self.study_id, number, metrics)
        self.on_event("epoch", number, metrics)

    @_deferring_errors
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        number = self._number(trial)
        outcome = self.searcher.outcomes.get(trial.trial_id)
        if number is None or outcome is None:
            return
        self._record_end(trial, number, outcome)

    @_deferring_errors
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """The trial's process or node died and Tune restarts it from its last checkpoint."""
        number = self._number(trial)
        if number is None:
            return
        if trial.trial_id in self.searcher.outcomes:
            # Tune restarts a trial whose ending failed after Optuna was told (an error in
            # another callback): its outcome stands, the rerun changes nothing.
            log.warning("trial %s restarted by Tune after it ended; its outcome stands", number)
            return
        retries = self.store.trial_retried(self.study_id, number)
        ot = self.searcher.optuna_trial(trial.trial_id)
        if ot is not None:
            ot.set_user_attr(P.ATTR_RETRIES, retries)
        message = trial_error_message(trial)
        log.warning("trial %s failed (%s); restart %d of at most %d from its last checkpoint",
                    number, message, retries, self.spec.failure.max_failures)
        self.on_event("retry", number, {"retries": retries, "error": message})

    @_deferring_errors
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        number = self._number(trial)
        if number is None:
            return
        epoch = int((trial.last_result or {}).get(P.EPOCH, 0) or 0)
        outcome = self.searcher.fail(trial.trial_id, trial_error_message(trial),
                                     epochs_completed=epoch)
        if outcome is not None:
            self._record_end(trial, number, outcome)
