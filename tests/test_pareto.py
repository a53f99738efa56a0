"""Pareto utilities against brute force and Optuna's own implementations."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest
from optuna._hypervolume import compute_hypervolume

from qsearch.search.pareto import (
    default_reference,
    hypervolume,
    knee_index,
    nondominated_sort,
    pareto_front_mask,
)

DIRS = ["maximize", "minimize", "minimize"]


def brute_front(values, directions):
    v = np.asarray(values, float) * np.array([-1 if d == "maximize" else 1 for d in directions])
    out = []
    for i, p in enumerate(v):
        dominated = any(np.all(q <= p) and np.any(q < p) for j, q in enumerate(v) if j != i)
        out.append(not dominated)
    return np.array(out)


@pytest.mark.parametrize("directions", [DIRS, ["minimize", "minimize"], ["maximize", "maximize"],
                                        ["minimize", "maximize", "maximize"]])
def test_front_matches_brute_force_with_ties(directions):
    rng = np.random.default_rng(0)
    # Coarse grid values force ties and exact duplicates.
    values = rng.integers(0, 5, size=(300, len(directions))).astype(float)
    np.testing.assert_array_equal(pareto_front_mask(values, directions),
                                  brute_front(values, directions))


def test_front_equals_optuna_best_trials():
    rng = np.random.default_rng(1)
    study = optuna.create_study(directions=DIRS)
    vals = rng.random((200, 3)).round(2)
    for v in vals:
        study.add_trial(optuna.trial.create_trial(values=list(v), state=optuna.trial.TrialState.COMPLETE))
    mask = pareto_front_mask(vals, DIRS)
    assert set(np.flatnonzero(mask)) == {t.number for t in study.best_trials}


def test_nondominated_sort_ranks():
    values = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [1.0, 3.0], [3.0, 1.0]]
    ranks = nondominated_sort(values, ["minimize", "minimize"])
    assert ranks.tolist() == [0, 1, 2, 1, 1]


def test_hypervolume_2d_by_hand_and_mixed_directions():
    # minimise both: points (1,3), (2,2), (3,1) vs reference (4,4): 3 + 2 + 1 = 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], ["minimize", "minimize"], [4, 4]) == pytest.approx(6)
    # the same front with the first objective maximised (negated values, negated reference)
    assert hypervolume([[-1, 3], [-2, 2], [-3, 1]], ["maximize", "minimize"], [-4, 4]) == pytest.approx(6)
    # dominated points and points outside the reference add nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0]], ["minimize", "minimize"],
                       [4, 4]) == pytest.approx(6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_matches_optuna(k):
    rng = np.random.default_rng(k)
    pts = rng.random((40, k))
    ref = np.full(k, 1.1)
    expected = compute_hypervolume(pts[pareto_front_mask(pts, ["minimize"] * k)], ref)
    assert hypervolume(pts, ["minimize"] * k, ref) == pytest.approx(expected, rel=1e-9)


def test_knee_prefers_the_balanced_point():
    front = [[0.99, 1.0, 1.0], [0.98, 0.2, 0.3], [0.50, 0.1, 0.1]]
    assert knee_index(front, DIRS) == 1
    assert knee_index([[0.9, 1.0, 1.0]], DIRS) == 0


def test_default_reference_is_worse_than_every_point():
    vals = np.array([[0.9, 0.03, 0.2], [0.95, 0.06, 0.4]])
    ref = default_reference(vals, ["accuracy", "size_mb", "backward_cost"], DIRS)
    assert ref[0] <= vals[:, 0].min() and ref[1] > vals[:, 1].max() and ref[2] >= 1.0
    assert default_reference(vals, ["accuracy", "size_mb", "backward_cost"], DIRS,
                             {"size_mb": 1.0})[1] == 1.0
    for combo in itertools.product([0, 1], repeat=2):
        assert hypervolume(vals[list(combo)], DIRS, ref) > 0
