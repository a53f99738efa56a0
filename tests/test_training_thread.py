"""The worker's long-lived training thread: every trial's training runs on it, on its own and
inside real Ray Tune trials (reused actors, results reported from that thread, a trial that
Tune stops through ``tune.report``)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from qsearch.search.training_thread import THREAD_NAME as TRAINING_THREAD
from qsearch.search.training_thread import run_on_training_thread


def _thread_name() -> str:
    return threading.current_thread().name


def test_calls_run_on_one_thread_that_is_not_the_callers():
    names = [run_on_training_thread(_thread_name) for _ in range(3)]
    other = threading.Thread(target=lambda: names.append(run_on_training_thread(_thread_name)))
    other.start()
    other.join(10)
    assert names == [TRAINING_THREAD] * 4
    assert _thread_name() != TRAINING_THREAD
    # A daemon: a trial stuck on it must not keep the worker process from exiting.
    assert [t.daemon for t in threading.enumerate() if t.name == TRAINING_THREAD] == [True]


@pytest.mark.timeout(60)  # a swallowed SystemExit would leave the caller waiting
def test_errors_and_system_exit_reach_the_caller_and_the_thread_lives_on():
    def boom() -> None:
        raise ValueError("bad trial")

    with pytest.raises(ValueError, match="bad trial"):
        run_on_training_thread(boom)
    with pytest.raises(SystemExit):  # what tune.report raises in a trial Tune stops
        run_on_training_thread(sys.exit, 0)
    assert run_on_training_thread(_thread_name) == TRAINING_THREAD


@pytest.mark.timeout(60)  # waiting for the busy thread would hang here
def test_a_call_while_the_thread_is_busy_runs_on_the_callers_thread():
    def nested() -> tuple[str, str]:
        return _thread_name(), run_on_training_thread(_thread_name)

    outer, inner = run_on_training_thread(nested)
    assert outer == inner == TRAINING_THREAD  # inline, no deadlock

    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    holder = threading.Thread(target=run_on_training_thread, args=(hold,))
    holder.start()
    assert started.wait(10)
    try:
        assert run_on_training_thread(_thread_name) == _thread_name()  # busy: ran here
    finally:
        release.set()
        holder.join(10)
    assert run_on_training_thread(_thread_name) == TRAINING_THREAD


def _trial(config: dict) -> None:
    from ray import tune

    tune_thread = _thread_name()  # Tune's own thread for this trial

    def work() -> None:
        for step in range(config["steps"]):
            tune.report({"steps": config["steps"], "step": step, "thread": _thread_name(),
                         "tune_thread": tune_thread, "pid": os.getpid()})

    run_on_training_thread(work)


def test_tune_trials_of_a_reused_actor_train_on_one_thread(ray_session, tmp_path):
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on workers' path

    class Collect(tune.Callback):  # qsearch turns Tune's file loggers off; results come here
        def __init__(self) -> None:
            self.results: dict[str, list[dict]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.results.setdefault(trial.trial_id, []).append(result)

    collect = Collect()
    # The first trial is stopped by Tune after two reports (tune.report raises SystemExit on
    # the training thread); the next ones must still get the same, live training thread.
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 1}),
        param_space={"steps": tune.grid_search([5, 2, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0, callbacks=[collect],
                                  stop=lambda _id, r: r["steps"] == 5 and r["step"] >= 1))
    assert not tuner.fit().errors
    runs = list(collect.results.values())
    assert sorted(len(r) for r in runs) == [2, 2, 2]  # the 5-step trial stopped after 2
    assert len({r["pid"] for run in runs for r in run}) == 1  # one reused actor
    assert {r["thread"] for run in runs for r in run} == {TRAINING_THREAD}
    tune_threads = {r["tune_thread"] for run in runs for r in run}
    assert TRAINING_THREAD not in tune_threads
    assert len(tune_threads) == 3  # Tune's thread is new for each trial; ours is not
