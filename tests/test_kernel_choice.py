"""Which trials compile the fused quantizer kernels (qsearch.train.kernels): small ones run
the eager kernels rather than pay ~2 s of compilation per worker; large ones compile."""

from __future__ import annotations

import pytest

from qsearch.config import parse_trial_config
from qsearch.quant import fused, native_lsq
from qsearch.train import kernels, train

SMALL = {"model": "tiny-cnn", "dataset": "digits", "epochs": 1, "device": "cpu",
         "w_bits": 4, "a_bits": 4, "warm_start": {"enabled": False}}

needs_compiler = pytest.mark.skipif(not fused.compile_enabled("cpu"),
                                    reason="torch.compile unavailable on this machine's CPU")


@pytest.fixture(autouse=True)
def compiled_path():
    """The choice concerns the compiled kernels; on CPU the native LSQ loops would serve these
    trials first (they need no per-process compilation), so they are off here."""
    native_lsq.set_enabled(False)
    yield
    native_lsq.set_enabled(True)


def _train_counting_compiles(monkeypatch, **env: str) -> int:
    for name in ("QSEARCH_COMPILE", "QSEARCH_NO_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fused.lsq_forward.reset()
    fused.lsq_backward.reset()
    train(parse_trial_config(SMALL))
    return fused.lsq_forward.compiled_variants + fused.lsq_backward.compiled_variants


def test_the_threshold_and_the_settings(monkeypatch):
    for name in ("QSEARCH_COMPILE", "QSEARCH_NO_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    resnet20_cifar_epoch = (40_551_040, 45_000, 1)
    quickstart = (1_788_544, 674, 4)
    assert kernels.compile_pays(*resnet20_cifar_epoch)
    assert not kernels.compile_pays(*quickstart)
    monkeypatch.setenv("QSEARCH_COMPILE", "1")
    assert kernels.compile_pays(*quickstart)
    monkeypatch.setenv("QSEARCH_COMPILE", "0")
    assert not kernels.compile_pays(*resnet20_cifar_epoch)
    monkeypatch.setenv("QSEARCH_COMPILE", "auto")
    monkeypatch.setenv("QSEARCH_NO_COMPILE", "1")  # the older switch still turns it off
    assert not kernels.compile_pays(*resnet20_cifar_epoch)
    assert not fused.compile_enabled("cpu")


@needs_compiler
def test_a_small_trial_runs_eager_and_leaves_compilation_on_after_it(monkeypatch):
    assert _train_counting_compiles(monkeypatch) == 0
    assert fused.compile_enabled("cpu")  # outside a trial the kernels compile again


@needs_compiler
def test_a_large_trial_compiles(monkeypatch):
    monkeypatch.setattr(kernels, "COMPILE_MIN_MACS", 1.0)  # this trial counts as large
    assert _train_counting_compiles(monkeypatch) > 0


@needs_compiler
def test_compile_on_compiles_every_trial(monkeypatch):
    assert _train_counting_compiles(monkeypatch, QSEARCH_COMPILE="1") > 0
