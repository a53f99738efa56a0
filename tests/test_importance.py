"""Parameter importance per objective over an Optuna study (qsearch.search.importance)."""

from __future__ import annotations

import json
import warnings

import optuna
import pytest

from qsearch.cli import main
from qsearch.errors import ConfigError, QsearchError
from qsearch.search.importance import param_importances, study_importances

PARAMS = ("lr", "w_bits", "a_bits")


def _tell(study, n=24):
    dists = {"lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True),
             "w_bits": optuna.distributions.IntDistribution(2, 8),
             "a_bits": optuna.distributions.CategoricalDistribution([2, 4, 8])}
    for i in range(n):
        params = {"lr": 0.001 * (1.2 ** i), "w_bits": 2 + i % 7, "a_bits": (2, 4, 8)[i % 3]}
        w, a = params["w_bits"], params["a_bits"]
        # accuracy rises with w_bits only; size grows with w_bits and a little with a_bits
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=[0.5 + 0.06 * w, 0.01 * w + 1e-4 * a]))
        if i % 8 == 0:  # failed trials carry no values and are not counted
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists, state=optuna.trial.TrialState.FAIL))


def _study(storage=None, name="imp"):
    study = optuna.create_study(study_name=name, storage=storage,
                                directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "size_mb"])  # as the driver does
    _tell(study)
    return study


@pytest.mark.parametrize("evaluator", ["ped-anova", "fanova", "mdi"])
def test_one_entry_per_searched_param_per_objective(evaluator):
    res = param_importances(_study(), evaluator=evaluator)
    assert [r.objective for r in res] == ["val_accuracy", "size_mb"]
    assert [r.direction for r in res] == ["maximize", "minimize"]
    for r in res:
        assert sorted(r.importances) == sorted(PARAMS)
        assert r.n_trials == 24
        assert sum(r.importances.values()) == pytest.approx(1.0)
    assert max(res[0].importances, key=res[0].importances.get) == "w_bits"


def test_objective_filter_and_errors():
    study = _study()
    (only,) = param_importances(study, ["size_mb"])
    assert only.objective == "size_mb"
    with pytest.raises(ConfigError, match="val_accuracy, size_mb"):
        param_importances(study, ["latency"])
    empty = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(QsearchError, match="at least 2"):
        param_importances(empty)


def test_importance_command_reads_the_store(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    _study(url, "imp")
    res = study_importances("imp", url)
    assert len(res) == 2
    assert main(["importance", "imp", "--storage", url, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [o["objective"] for o in doc["objectives"]] == ["val_accuracy", "size_mb"]
    assert all(sorted(o["importances"]) == sorted(PARAMS) for o in doc["objectives"])
    assert main(["importance", "imp", "--storage", url, "--objective", "val_accuracy",
                 "--evaluator", "mdi"]) == 0
    out = capsys.readouterr().out
    assert "w_bits" in out and "val_accuracy" in out and "size_mb" not in out
    assert main(["importance", "nope", "--storage", url]) == 2
    assert main(["importance", "imp", "--storage", f"sqlite:///{tmp_path / 'no.db'}"]) == 2
    assert not (tmp_path / "no.db").exists()
