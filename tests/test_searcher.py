"""The study searcher over Optuna ask/tell: duplicates are not trained again, configs that a
size bound rules out are not trained at all, and constraints reach Optuna."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from qsearch import protocol as P
from qsearch.config import parse_study_spec
from qsearch.search.known import known_values
from qsearch.search.searcher import StudySearcher
from qsearch.search.space import optuna_space


def _spec(**extra):
    data = {"name": "s", "objectives": ["val_accuracy", "size_mb"],
            "base": {"epochs": 1, "warm_start": {"epochs": 1}},
            "sampler": {"type": "random", "seed": 0},
            "search_space": {"w_bits": {"type": "categorical", "choices": [2, 8]}}}
    data.update(extra)
    return parse_study_spec(data)


def _searcher(spec, budget, known=None):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=spec.name, storage=storage,
                                directions=spec.directions,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    recorded = []
    s = StudySearcher(spec, study, storage, optuna_space(spec), budget=budget, known=known,
                      record=lambda *a: recorded.append(a))
    return s, study, recorded


def _finish(s, trial_id, job, acc=0.9):
    cfg = job[P.TRIAL_CONFIG]
    size = known_values(parse_study_spec_cfg(cfg))["size_mb"]
    s.on_trial_complete(trial_id, {P.DONE: True, "epoch": 1, "val_accuracy": acc,
                                   "size_mb": size})


def parse_study_spec_cfg(cfg):
    from qsearch.config import parse_trial_config

    return parse_trial_config(cfg)


def test_a_finished_config_is_reused_not_trained_again():
    spec = _spec(search_space={"w_bits": {"type": "categorical", "choices": [4]}})
    s, study, recorded = _searcher(spec, budget=3)
    trained = []
    for i in range(5):
        job = s.suggest(f"t{i}")
        if job is Searcher.FINISHED:
            break
        trained.append(job)
        _finish(s, f"t{i}", job)
    assert len(trained) == 1  # one config in the space: trained once
    assert s.reused == 2 and s.proposed == 3
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.user_attrs.get(P.ATTR_REUSED_FROM) for t in trials] == [None, 0, 0]
    assert trials[1].values == trials[0].values
    assert [r[1].reused_from for r in recorded] == [0, 0]


def test_a_size_bound_skips_training_and_reaches_optuna():
    size4 = known_values(_spec().trial_config({"w_bits": 2}))["size_mb"]
    spec = _spec(constraints={"size_mb": {"max": size4 * 1.01}},
                 search_space={"w_bits": {"type": "categorical", "choices": [2, 8]},
                               "lr": {"type": "float", "low": 0.01, "high": 0.05}})
    s, study, recorded = _searcher(spec, budget=4, known=known_values)
    handed = []
    for i in range(4):
        job = s.suggest(f"t{i}")
        handed.append(job)
        _finish(s, f"t{i}", job)
    assert s.proposed == 4
    assert all(j[P.TRIAL_CONFIG]["w_bits"] == 2 for j in handed)  # 8-bit never trained
    assert s.skipped >= 1 and len(recorded) == s.skipped
    skipped = [t for t in study.get_trials() if t.user_attrs.get(P.ATTR_FEASIBLE) is False]
    assert skipped and all(t.state == TrialState.FAIL for t in skipped)
    assert all(t.constraints["size_mb"] > 0 for t in skipped)  # told as infeasible
    assert all(not r[1].counted for r in recorded)


def test_a_bound_on_a_measured_value_marks_the_trial_infeasible():
    spec = _spec(constraints={"val_accuracy": {"min": 0.95}},
                 search_space={"w_bits": {"type": "categorical", "choices": [2]}})
    s, study, _ = _searcher(spec, budget=1)
    job = s.suggest("t0")
    _finish(s, "t0", job, acc=0.5)
    out = s.outcomes["t0"]
    assert out.state == TrialState.COMPLETE and not out.feasible
    assert study.get_trials()[0].constraints == {"val_accuracy": pytest.approx(0.45)}


def test_repeats_store_each_seed_and_the_spread():
    from qsearch.search.trainable import repeat_summary

    out = repeat_summary([{"val_accuracy": 0.9, "size_mb": 0.02, "model": "tiny-cnn"},
                          {"val_accuracy": 0.7, "size_mb": 0.02, "model": "tiny-cnn"},
                          {"val_accuracy": 0.8, "size_mb": 0.02, "model": "tiny-cnn"}],
                         ["val_accuracy", "size_mb"])
    assert out["val_accuracy"] == pytest.approx(0.8)  # the mean is what is optimized
    assert [out[f"val_accuracy.seed{i}"] for i in range(3)] == [0.9, 0.7, 0.8]
    assert out["val_accuracy.std"] == pytest.approx((0.02 / 3) ** 0.5)
    assert out["size_mb.std"] == 0.0 and out["repeats"] == 3


def test_repeats_need_a_study_without_rung_decisions():
    from qsearch.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _spec(repeats=3, base={"epochs": 3}, scheduler={"type": "asha"})
    assert e.value.field == "repeats"
