"""Shared fixtures. Tests are real: real training on small data, real databases, real Ray."""

from __future__ import annotations

import os

import pytest
import torch

# Database, Ray and study-spec fixtures (db_url, pg_url, ray_session) shared by the search tests.
pytest_plugins = ["_search_helpers"]

# Every test run gets its own warm-start cache, so nothing leaks between runs or into ~/.cache.
_CACHE = os.environ.setdefault(
    "QSEARCH_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qsearch-test-cache-{os.getpid()}")
)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (the native CPU kernels' own setting: with
    more, large tensors go to the compiled kernels), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config():
    """A fast digits/tiny-cnn TrialConfig factory: ``tiny_config(epochs=2, w_bits=2)``."""
    from qsearch.config import parse_trial_config

    def make(**overrides):
        base = {"model": "tiny-cnn", "dataset": "digits", "epochs": 2, "device": "cpu",
                "warm_start": {"epochs": 3}}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return parse_trial_config(base)

    return make
