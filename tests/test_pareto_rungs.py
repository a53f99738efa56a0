"""Multi-objective early stopping: dominated at a rung -> stopped; on the front -> kept."""

from __future__ import annotations

from ray.tune.schedulers import TrialScheduler

from qsearch.config import parse_study_spec
from qsearch.search.pareto_rungs import ParetoRungScheduler, dominates, rungs
from qsearch.search.space import build_scheduler

DIRS = ["maximize", "minimize"]  # val_accuracy up, size_mb down


def test_rungs_follow_asha():
    assert rungs(1, 2, 8) == [1, 2, 4]
    assert rungs(2, 3, 20) == [2, 6, 18]
    assert rungs(1, 2, 1) == []


def test_dominance():
    assert dominates([0.9, 0.02], [0.8, 0.03], DIRS)
    assert not dominates([0.9, 0.04], [0.8, 0.03], DIRS)  # bigger: a trade-off
    assert not dominates([0.9, 0.02], [0.9, 0.02], DIRS)  # equal is not better


def _sched():
    return ParetoRungScheduler(["val_accuracy", "size_mb"], DIRS, grace_period=1,
                               reduction_factor=2, max_t=4)


def test_a_dominated_trial_is_stopped_and_a_small_less_accurate_one_is_not():
    s = _sched()
    assert s.decide("big", {"epoch": 1, "val_accuracy": 0.90, "size_mb": 0.05}) == \
        TrialScheduler.CONTINUE
    # Less accurate AND bigger than "big": dominated at rung 1 -> stopped.
    assert s.decide("worse", {"epoch": 1, "val_accuracy": 0.80, "size_mb": 0.06}) == \
        TrialScheduler.STOP
    # Less accurate but smaller: on the front at this rung -> kept (ASHA on accuracy with
    # reduction factor 2 would stop it: it is in the bottom half).
    assert s.decide("small", {"epoch": 1, "val_accuracy": 0.70, "size_mb": 0.01}) == \
        TrialScheduler.CONTINUE
    # Between rungs nothing is decided.
    assert s.decide("worse2", {"epoch": 3, "val_accuracy": 0.1, "size_mb": 1.0}) == \
        TrialScheduler.CONTINUE


def test_spec_builds_the_pareto_scheduler():
    spec = parse_study_spec({
        "name": "p", "objectives": ["val_accuracy", "size_mb"], "base": {"epochs": 4},
        "scheduler": {"type": "pareto", "grace_period": 1},
        "search_space": {"w_bits": {"type": "categorical", "choices": [2, 4]}}})
    sched = build_scheduler(spec)
    assert isinstance(sched, ParetoRungScheduler)
    assert sched.rungs == [1, 2]
    assert sched.metric_keys == ["val_accuracy", "size_mb"]
