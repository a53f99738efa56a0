"""Per-layer search spaces by pattern (qsearch.search.expand) and ``qsearch space``."""

from __future__ import annotations

import json

import pytest

from qsearch.cli import main
from qsearch.config import IntDist, parse_study_spec
from qsearch.errors import ConfigError
from qsearch.search.expand import expand_search_space, layer_names

RESNET20_CONVS = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in (0, 1, 2)
                              for c in (1, 2)]


def _spec(space, model="resnet20", dataset="cifar10", **extra):
    return parse_study_spec({"name": "expand", "model": model, "dataset": dataset,
                             "objectives": ["val_accuracy", "size_mb"],
                             "search_space": space, **extra})


BITS = {"type": "int", "low": 2, "high": 8}


def test_glob_expands_to_one_dimension_per_layer_of_resnet20():
    spec = _spec({"layers.*.w_bits": BITS, "lr": {"type": "float", "low": 0.01, "high": 0.1}})
    out = expand_search_space(spec)
    layer_keys = [k for k in out.search_space if k.startswith("layers.")]
    assert layer_keys == [f"layers.{n}.w_bits" for n in RESNET20_CONVS + ["fc"]]
    assert len(layer_keys) >= 19 and "layers.*.w_bits" not in out.search_space
    assert all(out.search_space[k] == IntDist(low=2, high=8) for k in layer_keys)
    assert list(out.search_space)[-1] == "lr"  # other keys keep their place
    # every expanded point is a real trial config naming the layer
    cfg = out.trial_config({"layers.layer2.1.conv2.w_bits": 3})
    assert cfg.layers["layer2.1.conv2"].w_bits == 3
    assert expand_search_space(out) is out  # nothing left to expand


def test_regex_and_glob_subsets_and_exact_keys_win():
    spec = _spec({"layers.re:layer3\\..*.w_bits": BITS, "layers.layer1.*.a_bits": BITS,
                  "layers.layer3.0.conv1.w_bits": 8, "w_bits": BITS})
    out = expand_search_space(spec)
    w = [k for k in out.searched() if k.startswith("layers.") and k.endswith(".w_bits")]
    assert w == [f"layers.layer3.{b}.conv{c}.w_bits" for b in (0, 1, 2) for c in (1, 2)
                 if (b, c) != (0, 1)]
    assert out.search_space["layers.layer3.0.conv1.w_bits"].type == "fixed"  # exact wins
    a = [k for k in out.search_space if k.endswith(".a_bits")]
    assert a == [f"layers.layer1.{b}.conv{c}.a_bits" for b in (0, 1, 2) for c in (1, 2)]


@pytest.mark.parametrize("key", ["layers.block*.w_bits", "layers.re:block.*.w_bits",
                                 "layers.re:layer1.w_bits"])
def test_a_pattern_matching_no_layer_names_the_layers(key):
    spec = _spec({key: BITS})  # the torch-free spec check accepts the pattern
    with pytest.raises(ConfigError) as e:
        expand_search_space(spec)
    assert e.value.field == f"search_space.{key}"
    assert "matches no layer" in str(e.value)
    assert all(n in str(e.value) for n in ("conv1", "layer2.1.conv2", "fc"))


def test_overlapping_patterns_are_an_error():
    with pytest.raises(ConfigError, match="also sets"):
        expand_search_space(_spec({"layers.*.w_bits": BITS, "layers.layer1.*.w_bits": BITS}))


def test_layer_names_are_cached(monkeypatch):
    spec = _spec({"layers.*.w_bits": BITS}, model="tiny-cnn", dataset="digits")
    assert layer_names(spec) == ["stage1.0", "stage2.0.0", "stage3.0", "fc"]
    import qsearch.models as models

    monkeypatch.setattr(models, "build_model", lambda *a: pytest.fail("built twice"))
    assert len(expand_search_space(spec).searched()) == 4


def test_space_command_prints_the_expanded_space(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"name": "s", "model": "tiny-cnn", "dataset": "digits",
                                "objectives": ["val_accuracy", "size_mb"],
                                "search_space": {"layers.*.w_bits": BITS, "a_bits": 4}}))
    assert main(["space", str(path)]) == 0
    out = capsys.readouterr().out
    for n in ("stage1.0", "stage2.0.0", "stage3.0", "fc"):
        assert f"layers.{n}.w_bits: int 2..8" in out
    assert "val_accuracy: maximize" in out and "size_mb: minimize" in out and "MB" in out
    assert main(["space", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["path"] for d in doc["dimensions"] if d["searched"]] == [
        f"layers.{n}.w_bits" for n in ("stage1.0", "stage2.0.0", "stage3.0", "fc")]
    assert [o["direction"] for o in doc["objectives"]] == ["maximize", "minimize"]
    assert list(tmp_path.iterdir()) == [path]  # writes nothing
    path.write_text(path.read_text().replace("layers.*.w_bits", "layers.conv*.w_bits"))
    assert main(["space", str(path)]) == 2
    assert "matches no layer" in capsys.readouterr().err


def test_launch_dry_run_prints_the_expanded_space_and_writes_nothing(tmp_path, monkeypatch,
                                                                     capsys):
    from pathlib import Path

    from qsearch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QSEARCH_STORAGE", raising=False)
    spec = Path(__file__).resolve().parents[1] / "studies" / "perlayer-digits.yaml"
    assert main(["launch", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers.stage2.0.0.w_bits" in out and "(from layers.*.w_bits)" in out
    assert "val_accuracy: maximize" in out
    assert list(tmp_path.iterdir()) == []  # no database, no artifacts folder
