"""The dashboard app, served for real on a free port, against a real study.

The module fixture launches a tiny study (4 trials, 2 epochs, `qsearch launch` in a
subprocess) and starts the dashboard while the driver is still writing; the dashboard polls
every page until the launch ends. Then every page and callback is fetched over HTTP
(GET pages, POST /_dash-update-component) and the figure data is compared with the store.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from dashboards import create_app
from dashboards.readonly import open_source, readonly_url
from _dash_client import DashClient, find, text_of, trace
from _dash_data import (
    TINY_STUDY,
    launch_command,
    serve_in_thread,
    tiny_spec,
    tiny_study_paths,
    write_spec,
)
from qsearch.errors import ConfigError
from qsearch.store import Store, objective_info, queries

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Launch the tiny study and poll the dashboard while it runs."""
    base_dir = tmp_path_factory.getbasetemp() / "dash-study"
    spec_path, url, done = tiny_study_paths(base_dir)
    write_spec(spec_path, tiny_spec(url))
    log = open(base_dir / "launch.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(launch_command(spec_path), cwd=base_dir, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    db = Path(url.removeprefix("sqlite:///"))
    polls: list[dict[str, Any]] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # wait for the study row
            if db.exists():
                st = Store(url, create=False)
                try:
                    if st.has_schema() and st.get_study(TINY_STUDY) is not None:
                        break
                finally:
                    st.dispose()
            time.sleep(0.5)
        app = create_app(url)
        with serve_in_thread(app) as base:
            client = DashClient(base)
            while proc.poll() is None:  # the dashboard polls while the driver writes
                t0 = time.perf_counter()
                statuses = [requests.get(f"{base}{p}", timeout=60).status_code
                            for p in ("/", f"/study/{TINY_STUDY}")]
                page = client.page(f"/study/{TINY_STUDY}")
                refresh = client.call("study-header.children",
                                      {"study-refresh.n_intervals": 1,
                                       "study-name.data": TINY_STUDY})
                client.page("/")
                polls.append({"statuses": statuses, "s": time.perf_counter() - t0,
                              "interval_on": not find(page, "study-refresh")["props"]["disabled"],
                              "refresh_disabled": refresh["study-refresh"]["disabled"]})
                time.sleep(0.3)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (base_dir / "launch.log").read_text()
    if proc.returncode == 0:
        done.write_text(output)
    return {"url": url, "returncode": proc.returncode, "output": output, "polls": polls}


@pytest.fixture(scope="module")
def served(live: dict[str, Any]) -> Any:
    assert live["returncode"] == 0, live["output"][-3000:]
    app = create_app(live["url"])
    with serve_in_thread(app) as base:
        yield {"base": base, "client": DashClient(base), "url": live["url"],
               "store": Store(live["url"], create=False)}


# --------------------------------------------------------------------------- tests


def test_polling_never_fails_the_running_study(live: dict[str, Any]) -> None:
    out = " ".join(live["output"].split())  # rich wraps the summary line
    assert live["returncode"] == 0, out[-3000:]
    assert "(4 complete, 0 pruned, 0 failed, 0 lost)" in out, out[-2000:]
    store = Store(live["url"], create=False)
    assert [t["state"] for t in queries.trials(store, TINY_STUDY)] == ["COMPLETE"] * 4
    store.dispose()
    assert "database is locked" not in out and "readonly" not in out.lower()
    assert live["polls"], "the launch ended before the dashboard could poll it"
    assert all(s == 200 for p in live["polls"] for s in p["statuses"])
    # The study was seen running, with live refresh on, and the refresh callback kept it on.
    assert any(p["interval_on"] and not p["refresh_disabled"] for p in live["polls"])


def test_pages_served(served: dict[str, Any]) -> None:
    base = served["base"]
    _, front = queries.pareto_front(served["store"], TINY_STUDY)
    for path in ("/", f"/study/{TINY_STUDY}", f"/study/{TINY_STUDY}/trial/{front[0]['trial_number']}"):
        r = requests.get(base + path, timeout=30)
        assert r.status_code == 200 and "_dash-config" in r.text and "qsearch dashboard" in r.text
    css = requests.get(f"{base}/assets/style.css", timeout=30)
    assert css.status_code == 200 and ".data-table" in css.text


def test_study_list_matches_store(served: dict[str, Any]) -> None:
    page = served["client"].page("/")
    table = find(page, "studies-table")
    assert table is not None
    text = text_of(table)
    row = next(r for r in queries.list_studies(served["store"]) if r["name"] == TINY_STUDY)
    assert TINY_STUDY in text and "finished" in text
    snap, _ = queries.pareto_front(served["store"], TINY_STUDY)
    assert f"{snap['hypervolume']:.4g}" in text
    assert row["trials"]["COMPLETE"] == 4
    # live refresh is off once nothing runs
    assert find(page, "studies-refresh")["props"]["disabled"] is True


def _check_front(fig: dict[str, Any], store: Store) -> list[int]:
    _, front = queries.pareto_front(store, TINY_STUDY)
    stored = {p["trial_number"]: p for p in front}
    tr = trace(fig, "Pareto front")
    plotted = [c[0] for c in tr["customdata"]]
    assert sorted(plotted) == sorted(stored) and len(plotted) == len(stored)
    for n, x, y in zip(plotted, tr["x"], tr["y"]):
        assert x == pytest.approx(stored[n]["size_mb"]) and y == pytest.approx(stored[n]["accuracy"])
    complete = {t["number"] for t in queries.trials(store, TINY_STUDY, ["COMPLETE"])}
    dominated = {c[0] for c in trace(fig, "dominated")["customdata"]}
    assert dominated == complete - set(stored)
    return plotted


def test_study_page_figures_match_store(served: dict[str, Any]) -> None:
    client, store = served["client"], served["store"]
    page = client.page(f"/study/{TINY_STUDY}")
    front = _check_front(find(page, "pareto-2d")["props"]["figure"], store)
    fig3 = find(page, "pareto-3d")["props"]["figure"]
    assert sorted(c[0] for c in trace(fig3, "Pareto front")["customdata"]) == sorted(front)
    # the live-refresh callback returns the same front
    resp = client.call("study-header.children", {"study-refresh.n_intervals": 3,
                                                 "study-name.data": TINY_STUDY})
    _check_front(resp["pareto-2d"]["figure"], store)
    assert resp["study-refresh"]["disabled"] is True  # finished study: polling stops
    # hypervolume history == stored snapshots
    hv = trace(resp["hv-history"]["figure"], "hypervolume")
    snaps = queries.pareto_snapshots(store, TINY_STUDY)
    assert hv["y"] == pytest.approx([s["hypervolume"] for s in snaps])
    # Pareto table: one link per stored front trial
    table = text_of(find(page, "pareto-table"))
    for n in front:
        assert f"#{n}" in table
    # parallel coordinates: one line per COMPLETE trial, one axis per searched param
    pc = client.call("parcoords.figure", {"study-name.data": TINY_STUDY,
                                          "parcoords-objective.value": "size_mb"})
    dims = pc["parcoords"]["figure"]["data"][0]["dimensions"]
    labels = [d["label"] for d in dims]
    for param in ("w_bits", "a_bits", "methods.lts.enabled"):
        assert param in labels
    assert len(dims[0]["values"]) == 4


def test_click_opens_trial_page(served: dict[str, Any]) -> None:
    client, store = served["client"], served["store"]
    _, front = queries.pareto_front(store, TINY_STUDY)
    n = front[0]["trial_number"]
    resp = client.call("url.pathname", {"pareto-2d.clickData": {"points": [{"customdata": [n]}]},
                                        "study-name.data": TINY_STUDY},
                       changed="pareto-2d.clickData")
    assert resp["url"]["pathname"] == f"/study/{TINY_STUDY}/trial/{n}"
    page = client.page(resp["url"]["pathname"])
    assert f"Trial #{n}" in text_of(find(page, "trial-header"))
    layers = queries.layer_records(store, TINY_STUDY, n)
    bits = find(page, "layer-bits")["props"]["figure"]
    by_name = {t["name"]: t for t in bits["data"]}
    assert by_name["weights"]["x"] == [r["name"] for r in layers]
    assert by_name["weights"]["y"] == [r["w_bits"] for r in layers]
    assert by_name["activations"]["y"] == [r["a_bits"] for r in layers]
    assert by_name["gradients"]["y"] == [r["g_bits"] for r in layers]
    frozen = find(page, "layer-frozen")["props"]["figure"]["data"][0]["y"]
    assert frozen == pytest.approx([r["frozen_fraction"] for r in layers])
    epochs = queries.epoch_metrics(store, TINY_STUDY, n)
    curves = find(page, "epoch-curves")["props"]["figure"]
    key = "val_accuracy" if epochs[0].metrics.get("val_accuracy") is not None else "accuracy"
    acc = trace(curves, objective_info(key).label)  # the registry's label
    assert acc["x"] == [e.epoch for e in epochs]
    assert acc["y"] == pytest.approx([e.metrics[key] for e in epochs])
    config = json.loads(find(page, "trial-config")["props"]["children"])
    assert config["config"] == queries.trial(store, TINY_STUDY, n)["config"]


def test_download_button_gives_the_trial_record(served: dict[str, Any]) -> None:
    """The trial page's download is the trial as stored (values by name with the registry's
    labels, per-layer precision), read-only: also for a dominated trial whose weights are
    gone. Weights and deployable files are ``qsearch export``'s job."""
    client, store = served["client"], served["store"]
    _, front = queries.pareto_front(store, TINY_STUDY)
    n = front[0].trial_number
    resp = client.call("export-download.data", {"export-button.n_clicks": 1,
                                                "trial-key.data": {"study": TINY_STUDY,
                                                                   "number": n}})
    download = resp["export-download"]["data"]
    assert download["filename"] == f"{TINY_STUDY}-trial-{n}.json"
    doc = json.loads(download["content"])
    assert doc["format"] == "qsearch-trial-record" and doc["trial"] == n and doc["on_front"]
    assert list(doc["precision"]) == [r.name for r in queries.layer_records(store, TINY_STUDY, n)]
    rec = queries.require_study(store, TINY_STUDY)
    for o in rec.objectives:
        assert doc["values"][o]["value"] == pytest.approx(front[0].value(o))
        assert doc["values"][o]["label"] == objective_info(o).label
    assert doc["config"] == queries.trial(store, TINY_STUDY, n).config
    dominated = [t.number for t in queries.trials(store, TINY_STUDY, ["COMPLETE"])
                 if t.number not in {p.trial_number for p in front}]
    if dominated:
        resp = client.call("export-download.data", {
            "export-button.n_clicks": 1, "trial-key.data": {"study": TINY_STUDY,
                                                            "number": dominated[0]}})
        assert json.loads(resp["export-download"]["data"]["content"])["trial"] == dominated[0]


def test_unknown_pages_say_why(served: dict[str, Any]) -> None:
    client = served["client"]
    assert "no study named 'nope'" in text_of(client.page("/study/nope"))
    assert "has no trial 999" in text_of(client.page(f"/study/{TINY_STUDY}/trial/999"))
    page = text_of(client.page("/elsewhere"))
    assert "Page not found" in page and "/elsewhere" not in page


def test_dashboard_connection_is_read_only(served: dict[str, Any]) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    src = open_source(served["url"])
    assert "mode=ro" in src.ro_url
    with pytest.raises(OperationalError, match="readonly|read-only|query_only"), \
            src.store.engine.begin() as conn:
        conn.execute(text("DELETE FROM qsearch_trials"))
    src.close()
    assert len(queries.trials(served["store"], TINY_STUDY)) == 4


def test_storage_url_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--storage.*no SQLite database"):
        readonly_url(f"sqlite:///{tmp_path}/missing.db")
    with pytest.raises(ConfigError, match="in-memory"):
        readonly_url("sqlite://")


def test_cli_dashboard_binds_and_warns_on_wide_host(served: dict[str, Any], tmp_path: Path) -> None:
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from qsearch.cli import entry; entry()",
                             "dashboard", "--storage", served["url"], "--host", "0.0.0.0",
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ok = time.time() + 60, False
        while time.time() < deadline and not ok:
            try:
                ok = requests.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
            except requests.ConnectionError:
                time.sleep(0.3)
        assert ok
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "WITHOUT authentication" in out and "0.0.0.0" in out
