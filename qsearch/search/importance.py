"""Which searched parameters matter, per objective, through Optuna's public importance API.

A qsearch study is an ordinary Optuna study in the store's database (same name, metric names
= the study's objectives), so :func:`study_importances` loads it with
:func:`optuna.load_study` and calls :func:`optuna.importance.get_param_importances` once per
objective with ``target=lambda t: t.values[i]`` over the COMPLETE trials. PED-ANOVA (the
default) ranks what it takes to reach the best ``target_quantile`` of trials and assumes
lower is better, so maximised objectives are negated in the target (fANOVA and MDI measure
variance and do not care). Importances are normalised to sum to 1 per objective.

Used by ``qsearch importance``; the dashboard can call :func:`param_importances` on a study
it already holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from qsearch.errors import ConfigError, QsearchError

EVALUATORS = ("ped-anova", "fanova", "mdi")


@dataclass(frozen=True)
class ObjectiveImportance:
    objective: str
    direction: str
    evaluator: str
    n_trials: int  # COMPLETE trials the importances were computed on
    importances: dict[str, float]  # param -> importance (sums to 1, descending)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_evaluator(name: str, seed: int | None = 0) -> optuna.importance.BaseImportanceEvaluator:
    """Optuna's evaluator for ``ped-anova``, ``fanova`` or ``mdi`` (seeded where it can be)."""
    from optuna import importance as imp

    if name == "ped-anova":
        return imp.PedAnovaImportanceEvaluator()
    if name == "fanova":
        return imp.FanovaImportanceEvaluator(seed=seed)
    if name == "mdi":
        return imp.MeanDecreaseImpurityImportanceEvaluator(seed=seed)
    raise ConfigError("--evaluator", f"unknown evaluator {name!r}; choose one of "
                      f"{', '.join(EVALUATORS)}")


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names (Optuna metric names, as the driver sets them)."""
    names = study.metric_names
    return list(names) if names else [f"objective_{i}" for i in range(len(study.directions))]


def _target(i: int, maximize: bool) -> Callable[[FrozenTrial], float]:
    sign = -1.0 if maximize else 1.0
    return lambda t: sign * float(t.values[i])


def param_importances(study: optuna.Study, objectives: list[str] | None = None,
                      evaluator: str = "ped-anova", seed: int | None = 0
                      ) -> list[ObjectiveImportance]:
    """Importance of every searched parameter for each objective (all, or ``objectives``).

    The parameters are those of the COMPLETE trials (Optuna's default: for PED-ANOVA every
    parameter that appears in them). Raises a QsearchError when fewer than two trials are
    complete (nothing to compare)."""
    names = objective_names(study)
    wanted = objectives or names
    unknown = [o for o in wanted if o not in names]
    if unknown:
        raise ConfigError("--objective", f"{', '.join(unknown)} is not an objective of study "
                          f"{study.study_name!r}; its objectives are {', '.join(names)}")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        raise QsearchError(f"study {study.study_name!r} has {len(complete)} complete trial"
                           f"{'' if len(complete) == 1 else 's'}; importances need at least 2")
    out = []
    for name in wanted:
        i = names.index(name)
        direction = study.directions[i].name.lower()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental tags, "importances will be equal"
            imp = optuna.importance.get_param_importances(
                study, evaluator=make_evaluator(evaluator, seed),
                target=_target(i, direction == "maximize"), normalize=True)
        out.append(ObjectiveImportance(name, direction, evaluator, len(complete),
                                       {k: float(v) for k, v in imp.items()}))
    return out


def study_importances(study_name: str, storage: str, objectives: list[str] | None = None,
                      evaluator: str = "ped-anova", seed: int | None = 0
                      ) -> list[ObjectiveImportance]:
    """:func:`param_importances` of the Optuna study ``study_name`` in the database ``storage``."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise QsearchError(f"no study {study_name!r} in {storage}") from None
    return param_importances(study, objectives, evaluator, seed)
