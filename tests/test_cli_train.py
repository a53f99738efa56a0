"""``qsearch train``/``models``/``datasets`` as a user runs them, with real training on digits.

The acceptance run, the exit-code contract and the listings use a real subprocess of the
running interpreter (``python -m qsearch``); the other error cases call the same
``qsearch.cli.main`` in-process, because each fresh interpreter pays the torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qsearch.data import list_datasets
from qsearch.models import list_models

JSON_KEYS = {"accuracy", "size_mb", "bops", "backward_cost", "backward_flops", "backward_time",
             "backward_time_ratio", "backward_bops", "epochs", "wall_s"}


def _run(*args: str, cache: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["QSEARCH_CACHE"] = cache  # isolated FP32 warm-start cache
    # One intra-op thread: on a shared, oversubscribed CI box OpenMP spinning makes two
    # threads many times slower than one for these tiny models. Results are unaffected.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["COLUMNS"] = "200"  # tables are not truncated by the 80-column default
    return subprocess.run(
        [sys.executable, "-m", "qsearch", *args], capture_output=True, text=True, env=env,
        timeout=timeout, check=False,
    )


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _main(*args: str, cache: str, capsys, monkeypatch) -> tuple[int, str, str]:
    """``qsearch <args>`` in this process: (exit code, stdout, stderr)."""
    from qsearch.cli import main

    monkeypatch.setenv("QSEARCH_CACHE", cache)
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_acceptance_tiny_cnn_digits_w4a4(cache):
    """The acceptance run of the foundation issue: 5 QAT epochs of W4A4 reach >= 90%."""
    proc = _run("train", "--set", "model=tiny-cnn", "--set", "dataset=digits",
                "--set", "epochs=5", "--set", "w_bits=4", "--set", "a_bits=4", "--json",
                cache=cache)
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc)
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert JSON_KEYS <= out.keys()
    assert out["epochs"] == 5
    assert out["accuracy"] >= 0.90
    assert out["wall_s"] > 0
    # W4A4 with 8-bit first/last layers: far below the FP32 size and training cost
    assert 0 < out["size_mb"] < 0.05
    assert out["bops"] > 0
    assert 0 < out["backward_cost"] < 0.5
    # ... in the modelled bit-ops only: what executes is FP32 (fake-quantized) GEMMs, plus the
    # first layer's dX that LSQ's activation step needs.
    assert out["backward_bops"] == out["backward_cost"]
    assert 1.0 < out["backward_flops"] < 1.02
    assert out["backward_time"] > 0 and out["backward_time_ratio"] > 0


@pytest.mark.slow
def test_json_prints_counted_and_executed_lts_savings(cache):
    proc = _run("train", "--set", "model=tiny-cnn", "--set", "dataset=digits",
                "--set", "epochs=2", "--set", "w_bits=2", "--set", "a_bits=2",
                "--set", "methods.lts.enabled=true", "--set", "methods.lts.granularity=channel",
                "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"lts.flops_saved_counted", "lts.flops_saved_executed"} <= out.keys()
    assert out["lts.flops_saved_executed"] <= out["lts.flops_saved_counted"] + 1e-3


def test_bad_bits_exit_2_with_one_line(cache):
    proc = _run("train", "--set", "w_bits=9", cache=cache)
    assert proc.returncode == 2
    _no_traceback(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "w_bits" in lines[0] and "error" in lines[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (("train", "--set", "model=nope"), "model"),
        (("train", "--set", "epocs=3"), "epocs"),
        (("train", "--set", "layers.stage9.w_bits=3", "--set", "warm_start.enabled=false"),
         "layers.stage9"),
        (("train", "--set", "dataset=cifar10", "--set", "data.download=false"), "data.download"),
        (("train", "--bogus-flag"), "bogus"),
        (("train", "/nonexistent/trial.yaml"), "file not found"),
    ],
    ids=["unknown-model", "unknown-key", "unmatched-layer-rule", "cifar-missing", "bad-flag",
         "missing-file"],
)
def test_user_errors_exit_2_with_one_clear_line(args, needle, cache, tmp_path, capsys,
                                               monkeypatch):
    if "dataset=cifar10" in args:
        args = (*args, "--set", f"data.root={tmp_path / 'no-cifar'}")
    code, out, err = _main(*args, cache=cache, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert needle in err
    first = err.splitlines()[0]
    assert first.startswith("error:") and needle in first  # never wrapped over lines


def test_models_and_datasets_list_entries(cache):
    proc = _run("models", cache=cache)
    assert proc.returncode == 0
    for name in list_models():
        assert name in proc.stdout
    assert "3x32x32" in proc.stdout
    proc = _run("datasets", cache=cache)
    assert proc.returncode == 0
    for name in list_datasets():
        assert name in proc.stdout


def test_yaml_config_and_checkpoint_dir(cache, tmp_path, capsys, monkeypatch):
    """A config file plus overrides, with per-epoch checkpoints a second call resumes from."""
    cfg = tmp_path / "trial.yaml"
    cfg.write_text("model: tiny-cnn\ndataset: digits\nepochs: 1\nw_bits: 2\n"
                   "warm_start:\n  epochs: 1\n")
    ck = tmp_path / "ck"
    args = ("train", str(cfg), "--set", "a_bits=8", "--checkpoint-dir", str(ck), "--json")
    code, out, err = _main(*args, cache=cache, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    first = json.loads(out.strip().splitlines()[-1])
    assert first["epochs"] == 1
    assert [p.name for p in ck.glob("ckpt-*.pt")] == ["ckpt-00001.pt"]
    mtime = (ck / "ckpt-00001.pt").stat().st_mtime_ns
    # Same config again: the checkpoint already covers every epoch, nothing is retrained.
    code, out, err = _main(*args, cache=cache, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["accuracy"] == first["accuracy"] and again["size_mb"] == first["size_mb"]
    assert (ck / "ckpt-00001.pt").stat().st_mtime_ns == mtime
