"""What the dashboard, the report and ``qsearch pareto`` tell apart, on a real SQLite store
written through the driver's write path (tests/_dash_data.py:write_feature_study; the
per-layer sensitivity by the driver's own step on tiny-cnn/digits), served by the real Dash
app on a free port and called over HTTP: pruned/failed trials at their last rung,
infeasible and reused trials apart from the front, the repeats' error bars, the front
re-drawn on each training-cost axis, units and kinds on every axis, 3-D ranges that hold
every point, the sensitivity and importance panels, and a 404 page without paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from _dash_client import DashClient, find, text_of, trace
from _dash_data import FEATURE_KINDS, FEATURE_OBJECTIVES, FEATURE_STUDY, serve_in_thread, \
    write_feature_study
from dashboards import create_app
from qsearch.cli import main
from qsearch.store import Store, objective_info, queries

K = FEATURE_KINDS
APART = {"infeasible": "infeasible (violates a constraint)",
         "reused": "reused result (duplicate config)",
         "pruned": "pruned (at its last rung)", "failed": "failed (at its last epoch)"}


@pytest.fixture(scope="module")
def feature(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("features")
    db = base / "features.db"
    url = f"sqlite:///{db}"
    write_feature_study(url, sensitivity_cache=base / "cache")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    store = Store(url, create=False)
    with serve_in_thread(create_app(url)) as http:
        yield {"url": url, "db": db, "base": http, "client": DashClient(http), "store": store}
    store.dispose()
    # Everything the module did was read-only: the file is byte for byte what was written.
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def _study_fig(feature: dict[str, Any], cost: str | None = None) -> tuple[dict, dict, Any]:
    """(2-D figure, 3-D figure, caption) as the page shows them, for a training-cost axis."""
    if cost is None:
        page = feature["client"].page(f"/study/{FEATURE_STUDY}")
        return (find(page, "pareto-2d")["props"]["figure"],
                find(page, "pareto-3d")["props"]["figure"],
                find(page, "front-caption")["props"]["children"])
    r = feature["client"].call("study-header.children", {
        "study-refresh.n_intervals": 1, "front-cost.value": cost,
        "study-name.data": FEATURE_STUDY}, changed="front-cost.value")
    return r["pareto-2d"]["figure"], r["pareto-3d"]["figure"], r["front-caption"]["children"]


def _numbers(fig: dict[str, Any], name: str) -> list[int]:
    hits = [t for t in fig["data"] if t.get("name") == name]
    return sorted(c[0] for t in hits for c in t["customdata"])


def _front_by_hand(store: Store, objectives: list[str]) -> list[int]:
    """Non-dominated COMPLETE, feasible, not-reused trials on ``objectives`` (brute force)."""
    rows = [t for t in queries.trials(store, FEATURE_STUDY, ["COMPLETE"])
            if t.feasible is not False and t.reused_from is None]
    sign = [1 if objective_info(o).direction == "maximize" else -1 for o in objectives]
    pts = {t.number: [s * t.value(o) for s, o in zip(sign, objectives)] for t in rows}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return sorted(n for n, p in pts.items() if not any(dominates(q, p) for q in pts.values()))


def test_stopped_infeasible_and_reused_trials_are_drawn_apart(feature: dict[str, Any]) -> None:
    fig, fig3, _ = _study_fig(feature)
    stored = sorted(p.trial_number for p in queries.pareto_front(feature["store"],
                                                                 FEATURE_STUDY)[1])
    assert _numbers(fig, "Pareto front") == stored
    assert _numbers(fig, APART["infeasible"]) == [K["infeasible"]]
    assert _numbers(fig, APART["reused"]) == [K["reused"][0]]
    assert _numbers(fig, APART["pruned"]) == [K["pruned"]]
    assert _numbers(fig, APART["failed"]) == [K["failed"]]  # the other failed: no epoch
    apart = {K["infeasible"], K["reused"][0], K["pruned"], K["failed"], K["failed_early"]}
    assert not apart & set(_numbers(fig, "Pareto front") + _numbers(fig, "dominated"))
    assert not apart & set(_numbers(fig3, "Pareto front") + _numbers(fig3, "dominated"))
    # pruned / failed: greyed, at the values of their last reported epoch
    last = queries.last_epochs(feature["store"], queries.require_study(
        feature["store"], FEATURE_STUDY).id)
    for kind, epoch in (("pruned", 1), ("failed", 2)):
        tr = trace(fig, APART[kind])
        assert tr["marker"]["color"] == "#9ca3af"
        m = last[K[kind]].metrics
        assert last[K[kind]].epoch == epoch
        assert (tr["x"][0], tr["y"][0]) == pytest.approx((m["size_mb"], m["val_accuracy"]))
        assert f"at epoch {epoch} of 3" in tr["customdata"][0][-1]
    # ... and listed with how they ended
    table = text_of(find(feature["client"].page(f"/study/{FEATURE_STUDY}"), "other-trials"))
    assert "PRUNED at epoch 1 of 3" in table and "FAILED at epoch 2 of 3" in table
    assert "FAILED before its first epoch" in table and "INFEASIBLE" in table
    assert "reused trial #1's result" in table


def test_error_bars_are_the_stored_spread_over_seeds(feature: dict[str, Any]) -> None:
    fig, _, caption = _study_fig(feature)
    front = trace(fig, "Pareto front")
    last = queries.last_epochs(feature["store"], queries.require_study(
        feature["store"], FEATURE_STUDY).id)
    want = [last[c[0]].metrics["val_accuracy.std"] for c in front["customdata"]]
    assert front["error_y"]["visible"] and front["error_y"]["array"] == pytest.approx(want)
    assert "standard deviation over the seeds" in text_of(caption)
    assert "mean of 3 seeds" in front["customdata"][0][-1]


@pytest.mark.parametrize("cost", ["backward_time", "backward_bops", "backward_flops"])
def test_front_redrawn_on_each_training_cost(feature: dict[str, Any], cost: str) -> None:
    fig, fig3, caption = _study_fig(feature, cost)
    axes = [cost if o == "backward_flops" else o for o in FEATURE_OBJECTIVES]
    assert _numbers(fig, "Pareto front") == _front_by_hand(feature["store"], axes)
    assert _numbers(fig3, "Pareto front") == _front_by_hand(feature["store"], axes)
    info = objective_info(cost)
    # the chosen cost is named with unit and kind: colour bar, 3-D axis, caption
    assert fig["layout"]["coloraxis"]["colorbar"]["title"]["text"].replace("<br>", " ") == \
        info.axis_title
    assert fig3["layout"]["scene"]["yaxis"]["title"]["text"].replace("<br>", " ") == \
        f"{cost} ({info.unit}, {info.kind})"
    words = text_of(caption)
    assert info.axis_title in words
    assert ("recomputed" in words) == (cost != "backward_flops")
    assert "hovertemplate" in trace(fig, "Pareto front") and info.unit in \
        trace(fig, "Pareto front")["hovertemplate"]


def test_the_cost_axes_give_different_fronts(feature: dict[str, Any]) -> None:
    """Without this the re-draw test could pass by ignoring the chosen axis."""
    fronts = {c: _front_by_hand(feature["store"], ["val_accuracy", "size_mb", c])
              for c in ("backward_flops", "backward_time")}
    assert fronts["backward_flops"] != fronts["backward_time"]


def test_every_axis_has_unit_and_kind_and_3d_holds_every_point(feature: dict[str, Any]) -> None:
    fig, fig3, _ = _study_fig(feature)
    kinds = ("measured", "executed", "computed", "modelled")
    for ax in ("xaxis", "yaxis"):
        words = fig["layout"][ax]["title"]["text"]
        assert any(k in words for k in kinds) and "(" in words
    scene = fig3["layout"]["scene"]
    for a in "xyz":
        ax = scene[f"{a}axis"]
        assert any(k in ax["title"]["text"] for k in kinds)
        lo, hi = ax["range"]
        vals = [x for t in fig3["data"] for x in t[a] if x is not None]
        pad = (max(vals) - min(vals)) * 0.05
        assert lo < min(vals) - pad / 2 and hi > max(vals) + pad / 2, (a, ax["range"])
    # the trial page's per-layer chart: bits with their unit
    page = feature["client"].page(f"/study/{FEATURE_STUDY}/trial/0")
    bits = find(page, "layer-bits")["props"]["figure"]["layout"]
    assert "bits" in bits["yaxis"]["title"]["text"] and "computed" in bits["yaxis"]["title"]["text"]


def test_sensitivity_and_importance_panels(feature: dict[str, Any]) -> None:
    import optuna

    from qsearch.search.importance import param_importances

    r = feature["client"].call("sensitivity.figure", {"study-name.data": FEATURE_STUDY})
    sens = r["sensitivity"]["figure"]
    attrs = optuna.load_study(study_name=FEATURE_STUDY, storage=feature["url"]).user_attrs
    layers = attrs["qsearch_sensitivity"]["layers"]
    bar = sens["data"][0]
    assert bar["x"] == [x["layer"] for x in layers] == ["stage1.0", "stage2.0.0", "stage3.0",
                                                        "fc"]
    assert bar["y"] == pytest.approx([x["sensitivity"] for x in layers])
    assert "Hutchinson" in sens["layout"]["yaxis"]["title"]["text"]
    assert "measured" in sens["layout"]["yaxis"]["title"]["text"]
    imp = r["importance"]["figure"]
    want = param_importances(optuna.load_study(study_name=FEATURE_STUDY,
                                               storage=feature["url"]))
    assert [t["name"] for t in imp["data"]] == [
        f"{objective_info(w.objective).label} {objective_info(w.objective).arrow}" for w in want]
    for t, w in zip(imp["data"], want):
        assert dict(zip(t["y"], t["x"])) == pytest.approx(w.importances)
    assert "computed" in imp["layout"]["xaxis"]["title"]["text"]


def test_pruned_and_failed_trial_pages_say_how_they_ended(feature: dict[str, Any]) -> None:
    client = feature["client"]
    page = client.page(f"/study/{FEATURE_STUDY}/trial/{K['pruned']}")
    head = text_of(find(page, "trial-header"))
    assert "PRUNED at epoch 1 of 3" in head and "at epoch 1" in head
    bits = find(page, "layer-bits")["props"]["figure"]["layout"]["annotations"][0]["text"]
    assert "pruned at epoch 1 of 3" in bits and "not finished" not in bits
    page = client.page(f"/study/{FEATURE_STUDY}/trial/{K['failed']}")
    assert "FAILED at epoch 2 of 3" in text_of(find(page, "trial-header"))
    assert "loss became NaN" in json.dumps(find(page, "trial-header"))
    page = client.page(f"/study/{FEATURE_STUDY}/trial/{K['reused'][0]}")
    assert "reused trial #1's result" in text_of(find(page, "trial-header"))


def test_not_found_pages_show_no_internal_path(feature: dict[str, Any]) -> None:
    import requests

    client = feature["client"]
    for path in ("/no/such/page", "/study/nope", f"/study/{FEATURE_STUDY}/trial/x"):
        words = json.dumps(client.page(path))
        assert "not found" in words.lower() or "no study named" in words
        for secret in (str(feature["db"]), "sqlite", path, feature["base"]):
            assert secret not in words, (path, secret)
    # nor in the HTML every page is served with
    html = requests.get(f"{feature['base']}/no/such/page", timeout=30).text
    assert str(feature["db"]) not in html and "sqlite" not in html


def test_report_names_the_cost_axis_and_draws_the_apart_trials(feature: dict[str, Any],
                                                              tmp_path: Path) -> None:
    from dashboards import write_report

    out = write_report(FEATURE_STUDY, tmp_path / "r.html", feature["url"])
    text = out.read_text()
    assert "training-cost axis: backward FLOPs (x FP32, executed)" in text
    for name in APART.values():
        assert f'"name":"{name}"' in text
    assert '"name":"sensitivity"' in text


def test_cli_pareto_redraws_on_other_objectives(feature: dict[str, Any],
                                                capsys: pytest.CaptureFixture) -> None:
    axes = ["val_accuracy", "size_mb", "backward_time"]
    args = ["pareto", FEATURE_STUDY, "--storage", feature["url"]]
    assert main([*args, "--objectives", ",".join(axes), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["front"] == "recomputed"
    assert sorted(p["trial_number"] for p in doc["points"]) == \
        _front_by_hand(feature["store"], axes)
    assert [o["name"] for o in doc["objectives"]] == axes
    assert doc["objectives"][2]["unit"] == "s / sample" and \
        doc["objectives"][2]["kind"] == "measured"
    assert main([*args, "--objectives", ",".join(axes)]) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "re-drawn on val_accuracy, size_mb, backward_time" in table
    assert objective_info("backward_time").axis_title in table
    # the stored front names its cost axis too
    assert main(args) == 0
    assert objective_info("backward_flops").axis_title in " ".join(capsys.readouterr().out.split())
    for bad in ("val_accuracy,size_mb,widgets", "val_accuracy", "test_accuracy,size_mb"):
        assert main([*args, "--objectives", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--objectives" in err[0], err


def test_cli_pareto_table_prints_every_value_whole(feature: dict[str, Any],
                                                  capsys: pytest.CaptureFixture) -> None:
    """Captured (not a terminal), the table takes the width it needs: no value or header is
    cut to an ellipsis, the ``accuracy`` alias of ``val_accuracy`` is not a second column,
    and every column is in the legend with its unit and kind. Fails on rich's 80-column
    default (every number ended in '…')."""
    assert main(["pareto", FEATURE_STUDY, "--storage", feature["url"]]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    header = next(ln for ln in out.splitlines() if "trial" in ln)
    cols = [c.strip().rstrip("↑↓") for c in header.strip("┃").split("┃")]
    assert "accuracy" not in cols and "val_accuracy" in cols
    legend = " ".join(out.split())
    for name in cols[1:-1]:  # between "trial" and "knee"
        assert objective_info(name).axis_title in legend, name
