"""Export a trial of a real (tiny) study, then rebuild it from the export alone."""

from __future__ import annotations

import json

import pytest
import yaml
from _search_helpers import tiny_spec

from qsearch.cli import main
from qsearch.errors import ConfigError
from qsearch.export import evaluate_export, export_trial, load_export, select_trial
from qsearch.search import launch
from qsearch.store import Store, queries
from qsearch.config import parse_study_spec


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("export")
    url = f"sqlite:///{tmp / 'q.db'}"
    spec = parse_study_spec(tiny_spec("exp", url, tmp, budget={"num_trials": 3, "max_concurrent": 1},
                                      base={"epochs": 2, "device": "cpu", "batch_size": 128,
                                            "warm_start": {"epochs": 2}},
                                      sampler={"type": "random", "seed": 5},
                                      artifacts={"dir": str(tmp / "art"), "keep": "all"}))
    assert launch(spec, display=False).complete == 3
    return url, tmp


def test_rules_pick_from_the_stored_front(finished_study):
    url, _ = finished_study
    store = Store(url, create=False)
    try:
        _, front = queries.pareto_front(store, "exp")
        best_acc = max(front, key=lambda p: (p["accuracy"], -p["size_mb"]))
        smallest = min(front, key=lambda p: (p["size_mb"], -p["accuracy"]))
        assert select_trial(store, "exp", rule="max-accuracy") == best_acc["trial_number"]
        assert select_trial(store, "exp", rule="min-size") == smallest["trial_number"]
        knee = [p["trial_number"] for p in front if p["is_knee"]]
        assert select_trial(store, "exp", rule="knee") == knee[0]
        limit = smallest["size_mb"]
        assert queries.trial(store, "exp", select_trial(
            store, "exp", rule="max-accuracy", max_size_mb=limit))["size_mb"] <= limit
        with pytest.raises(ConfigError, match="none of the"):
            select_trial(store, "exp", rule="knee", min_accuracy=1.01)
        with pytest.raises(ConfigError, match="unknown rule"):
            select_trial(store, "exp", rule="fastest")
    finally:
        store.dispose()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_export_then_eval_reproduces_stored_values(finished_study, tmp_path, suffix):
    url, _ = finished_study
    store = Store(url, create=False)
    try:
        number = select_trial(store, "exp", rule="max-accuracy")
        out = tmp_path / f"best{suffix}"
        doc = export_trial(store, "exp", number, out)
        row = queries.trial(store, "exp", number)
    finally:
        store.dispose()
    loaded = load_export(out)
    assert loaded == json.loads(json.dumps(doc))
    assert loaded["provenance"]["study"] == "exp" and loaded["provenance"]["trial"] == number
    assert len(loaded["provenance"]["spec_hash"]) == 64 and loaded["version"] == 1
    assert loaded["config"]["w_bits"] == row["config"]["w_bits"]
    bits = [p["w_bits"] for p in loaded["precision"].values()]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {row["config"]["w_bits"]}
    r = evaluate_export(out)
    assert r["accuracy"] == row["accuracy"] and r["size_mb"] == pytest.approx(row["size_mb"], abs=1e-12)
    assert r["match"]


def test_cli_export_and_eval(finished_study, tmp_path, capsys):
    url, _ = finished_study
    out = tmp_path / "k.json"
    assert main(["export", "exp", "--storage", url, "--rule", "knee", "-o", str(out)]) == 0
    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["match"] is True
    assert main(["pareto", "exp", "--storage", url, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("trial_number,accuracy,size_mb,backward_cost,is_knee")
    assert main(["status", "exp", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "COMPLETE" in table and "w_bits=" in table  # whole words, even on 80 columns
    assert main(["studies", "--storage", url]) == 0
    listing = capsys.readouterr().out
    assert "exp" in listing and "finished" in listing
    # A tampered weights file is caught.
    pt = out.with_suffix(".pt")
    pt.write_bytes(pt.read_bytes()[:-10])
    assert main(["eval", str(out)]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"format": "something-else"}))
    assert main(["eval", str(bad)]) == 2


@pytest.mark.parametrize("command", [["studies"], ["pareto", "exp"], ["export", "exp", "-o", "x.json"]])
def test_read_commands_on_a_missing_sqlite_file_fail_without_creating_it(tmp_path, capsys,
                                                                         command):
    missing = tmp_path / "nowhere.db"
    assert main([*command, "--storage", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert "storage" in err and str(missing) in err and "--storage" in err
    assert not missing.exists()
