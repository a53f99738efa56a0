"""Per-layer Hessian sensitivity (cached like the warm start) and the seeds it gives."""

from __future__ import annotations

import json

import pytest

from qsearch.config import parse_study_spec
from qsearch.errors import ConfigError
from qsearch.search import sensitivity as S
from qsearch.search.expand import expand_search_space

LAYERS = ["stage1.0", "stage2.0.0", "stage3.0", "fc"]


def _spec(tmp_path, space=None, **sampler):
    return parse_study_spec({
        "name": "sens", "model": "tiny-cnn", "dataset": "digits",
        "base": {"epochs": 1, "device": "cpu", "warm_start": {"epochs": 1,
                                                              "cache_dir": str(tmp_path)}},
        "objectives": ["val_accuracy", "size_mb"],
        "sampler": {"sensitivity": True, **sampler},
        "search_space": space or {"layers.*.w_bits": {"type": "int", "low": 2, "high": 8},
                                  "a_bits": {"type": "categorical", "choices": [2, 4, 8]}}})


def test_sensitivity_is_cached_and_seeds_are_points_of_the_space(tmp_path, monkeypatch):
    spec = expand_search_space(_spec(tmp_path))
    cfg = spec.base_config()
    first = S.sensitivity_profile(cfg, probes=2, batches=1)
    assert first.computed_now and first.path.is_relative_to(tmp_path / "sensitivity")
    assert list(first.layers) == LAYERS
    assert all(v.n_params > 0 and v.sensitivity >= 0 for v in first.layers.values())
    assert any(v.sensitivity > 0 for v in first.layers.values())
    assert json.loads(first.path.read_text())["estimator"] == "hutchinson"

    # Second call: from the cache, nothing recomputed (a recompute would fail here).
    monkeypatch.setattr(S, "_compute", lambda *a: pytest.fail("recomputed"))
    sens = S.layer_sensitivity(cfg, probes=2, batches=1)
    assert sens == first.as_dict()
    assert not S.sensitivity_profile(cfg, probes=2, batches=1).computed_now
    # Another estimator setting is another cache entry.
    assert S.cache_path(cfg, probes=3, batches=1) != first.path

    seeds = S.seed_configs(spec, sens, 4)
    assert 2 <= len(seeds) <= 4
    assert len({tuple(s.values()) for s in seeds}) == len(seeds)  # distinct
    space = spec.searched()
    sizes = {"stage1.0": 288, "stage2.0.0": 18432, "stage3.0": 36864, "fc": 640}
    avg = []
    for s in seeds:
        assert sorted(s) == sorted(f"layers.{n}.w_bits" for n in LAYERS)
        for path, v in s.items():
            d = space[path]
            assert isinstance(v, int) and d.low <= v <= d.high
        spec.trial_config(s)  # a valid trial config
        avg.append(sum(sizes[k.split(".", 1)[1].rsplit(".", 1)[0]] * v for k, v in s.items())
                   / sum(sizes.values()))
    assert avg == sorted(avg)  # one per budget, lowest first


def test_greedy_spends_bits_where_sensitivity_per_parameter_is_high():
    params = {"a": 100, "b": 10_000, "c": 10_000}
    choices = {k: [2, 4, 8] for k in params}
    sens = {"a": 1.0, "b": 1.0, "c": 0.01}
    bits = S.allocate(sens, params, choices, budget=3.1)
    assert bits["a"] == 8  # same sensitivity, 100x fewer weights: cheapest bits first
    assert bits["b"] == 4 and bits["c"] == 2  # b is 100x more sensitive than c
    total = sum(params.values())
    assert sum(params[k] * b for k, b in bits.items()) / total <= 3.1
    assert S.allocate(sens, params, choices, budget=2.0) == {"a": 2, "b": 2, "c": 2}
    assert S.allocate(sens, params, choices, budget=8.0) == {"a": 8, "b": 8, "c": 8}
    assert S.relative_noise(2) > S.relative_noise(4) > S.relative_noise(8) > 0


def test_seeds_respect_categorical_choices_and_need_layer_dimensions(tmp_path):
    spec = expand_search_space(_spec(tmp_path, {
        "layers.*.w_bits": {"type": "categorical", "choices": [2, 3, 6]},
        "layers.fc.w_bits": 8}))
    sens = {n: 1.0 for n in LAYERS}
    for s in S.seed_configs(spec, sens, 3):
        assert "layers.fc.w_bits" not in s  # fixed, not searched
        assert set(s.values()) <= {2, 3, 6}
    with pytest.raises(ConfigError, match="no sensitivity for layer"):
        S.seed_configs(spec, {"fc": 1.0}, 2)
    with pytest.raises(ConfigError, match="sampler.sensitivity"):
        _spec(tmp_path, {"w_bits": {"type": "int", "low": 2, "high": 8}})
