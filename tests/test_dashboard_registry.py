"""The dashboards and the report take objective names, labels, units and directions from the
objective registry: a study over an objective registered only in this test file, written
through the store's API (no training), renders with that objective's words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsearch.config.objectives import Objective, get_objective, register_objective, \
    unregister_objective
from qsearch.store import Store, objective_values


@pytest.fixture
def widgets():
    obj = register_objective(Objective("widget_count", "minimize", "widget count",
                                       unit="widgets", kind="executed"))
    yield obj
    unregister_objective(obj.name)


@pytest.fixture
def study_url(tmp_path: Path, widgets: Objective) -> str:
    from qsearch.search.front import update_snapshot

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    store = Store(url)
    rec, _ = store.create_or_get_study(
        "reg", spec_yaml="", spec_hash="h" * 64, search_hash="g" * 64,
        objectives=["accuracy", "widget_count", "size_mb"],
        directions=["maximize", "minimize", "minimize"], artifacts_dir=str(tmp_path))
    for n, (acc, w, size) in enumerate([(0.9, 30.0, 0.2), (0.8, 10.0, 0.1), (0.7, 40.0, 0.3)]):
        store.trial_started(rec.id, n, optuna_trial_id=n, params={"w_bits": 2 + n},
                            config={"w_bits": 2 + n, "a_bits": 4}, max_epochs=1)
        store.record_epoch(rec.id, n, {"epoch": 1, "accuracy": acc, "widget_count": w})
        store.trial_finished(rec.id, n, state="COMPLETE", detail="finished", counted=True,
                             values=objective_values({"accuracy": acc, "widget_count": w,
                                                      "size_mb": size, "unknown": 1.0}),
                             epochs_completed=1,
                             layers=[{"name": "fc", "kind": "linear", "params": 5, "macs": 5,
                                      "w_bits": 2 + n, "a_bits": 4}])
        update_snapshot(store, rec.id, rec.objectives, rec.directions, trigger_trial=n)
    store.set_status(rec.id, "finished", finished=True)
    store.dispose()
    return url


def test_figures_tables_and_downloads_use_the_registry(study_url: str, widgets: Objective) -> None:
    from dashboards import data
    from dashboards.pages import study, trial
    from dashboards.readonly import open_source
    from dashboards.report import render_report

    acc, size = get_objective("accuracy"), get_objective("size_mb")
    src = open_source(study_url)
    try:
        view = data.study_view(src, "reg")
        assert [o.name for o in view.objectives] == ["accuracy", "widget_count", "size_mb"]
        assert view.objectives[1].label == "widget count"
        assert sorted(view.front_numbers) == [0, 1]  # trial 2 is dominated by trial 0

        f2 = study._figures(view)[0].to_plotly_json()
        layout = f2["layout"]
        # first objective up, second across, third as colour; registry words on the axes
        # (wrapped into lines so that long labels never run into the legend or colour bar)
        assert layout["yaxis"]["title"]["text"].replace("<br>", " ") == acc.axis_title
        assert layout["xaxis"]["title"]["text"].replace("<br>", " ") == widgets.axis_title
        front = next(t for t in f2["data"] if t["name"] == "Pareto front")
        assert sorted(zip(front["x"], front["y"])) == [(10.0, 0.8), (30.0, 0.9)]
        assert "widget count" in front["hovertemplate"] and "widgets" in front["hovertemplate"]
        assert layout["coloraxis"]["colorbar"]["title"]["text"].replace("<br>", " ") == \
            size.axis_title

        pc = study.parcoords_figure(src, "reg", "widget_count").to_plotly_json()["data"][0]
        assert "widget_count (widgets, executed)" in [d["label"] for d in pc["dimensions"]]
        assert pc["line"]["colorscale"]  # coloured by the chosen objective
        assert list(pc["line"]["color"]) == [30.0, 10.0, 40.0]

        names, rows = study.front_rows(view)
        assert names == ["accuracy", "widget_count", "size_mb"]  # "unknown" is not stored
        assert study.column_titles(names, view.record.objectives)[1] == "widget count (widgets) ↓"

        html = render_report(src, "reg")
        assert "widget count (widgets) ↓" in html and widgets.axis_title in html

        _, text = trial.export_json(src, "reg", 1)
        doc = json.loads(text)
        assert doc["values"]["widget_count"] == {"value": 10.0, "label": "widget count",
                                                 "unit": "widgets", "direction": "minimize",
                                                 "kind": "executed"}
        assert doc["values"]["accuracy"]["label"] == acc.label and doc["on_front"]
        assert list(doc["precision"]) == ["fc"]

        summary = next(s for s in data.list_studies(src) if s.name == "reg")
        assert summary.best == {"accuracy": 0.9, "widget_count": 10.0, "size_mb": 0.1}
    finally:
        src.close()


def test_the_dashboard_never_calls_the_write_side(study_url: str, monkeypatch) -> None:
    """Its trial download is read-only (no ``export_trial``, which copies weights) and its
    database handle has no write methods."""
    import qsearch.export
    from dashboards.pages import trial
    from dashboards.readonly import open_source

    def boom(*_a, **_k):
        raise AssertionError("the dashboard called export_trial")

    monkeypatch.setattr(qsearch.export, "export_trial", boom)
    src = open_source(study_url)
    try:
        name, text = trial.export_json(src, "reg", 2)  # dominated: no weights, still fine
        assert name == "reg-trial-2.json" and json.loads(text)["trial"] == 2
        for write in ("trial_finished", "write_snapshot", "acquire_lease", "ensure_schema"):
            assert not hasattr(src.store, write)
    finally:
        src.close()
