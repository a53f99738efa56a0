"""End to end: real studies through Ray Tune + Optuna into SQLite and PostgreSQL.

Kept tiny (3 epochs, 4-6 trials, 2-epoch warm start shared by the session's cache), Ray is
started once per session with 2 CPUs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from _search_helpers import start_driver, stored_trials, tiny_spec, wait_for
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from qsearch.errors import QsearchError
from qsearch.search import launch
from qsearch.store import LeaseError, Store, queries
from qsearch.store.journal import journal_mode
from qsearch.config import parse_study_spec

BROKEN_CACHE = "/dev/null/qsearch-cache"  # mkdir fails: a config that raises in the worker


def test_study_end_to_end(db_url, tmp_path, ray_session):
    spec = parse_study_spec(tiny_spec(
        "e2e", db_url, tmp_path,
        budget={"num_trials": 6, "max_concurrent": 1},
        objectives=["val_accuracy", "size_mb", "backward_flops"],
        sampler={"type": "random", "seed": 2},
        scheduler={"type": "asha", "metric": "val_accuracy", "grace_period": 1,
                   "reduction_factor": 2},
        search_space={
            "w_bits": {"type": "categorical", "choices": [2, 4, 8]},
            "lr": {"type": "float", "low": 0.002, "high": 0.05, "log": True},
            "warm_start.cache_dir": {"type": "categorical", "choices": [None, BROKEN_CACHE]},
        }))
    result = launch(spec, display=False)
    assert result.status == "finished" and result.counted == 6
    if db_url.startswith("sqlite"):  # WAL while it ran, one plain file now (store/journal.py)
        db = Path(make_url(db_url).database)
        assert journal_mode(db) == "delete"
        assert [p.name for p in db.parent.iterdir() if p.name.startswith(db.name)] == [db.name]

    study = optuna.load_study(study_name="e2e", storage=db_url)
    # Selection is on validation data: test accuracy is stored, never an Optuna objective.
    assert study.metric_names == ["val_accuracy", "size_mb", "backward_flops"]
    by_state = {st: [t for t in study.trials if t.state == st] for st in TrialState}
    assert not by_state[TrialState.RUNNING]
    assert by_state[TrialState.COMPLETE], "the seed should give finished trials"
    assert by_state[TrialState.PRUNED], "ASHA should stop a weaker trial"
    assert by_state[TrialState.FAIL], "the broken cache dir should fail a trial"
    for t in study.trials:
        assert t.user_attrs["config"]["model"] == "tiny-cnn"
    for t in by_state[TrialState.FAIL]:
        assert t.params["warm_start.cache_dir"] == BROKEN_CACHE
        assert "Error" in t.user_attrs["error"] and t.user_attrs["qsearch_counted"]
    for t in by_state[TrialState.PRUNED]:
        assert 1 <= t.user_attrs["pruned_at_epoch"] < 3
    for t in by_state[TrialState.COMPLETE]:
        assert t.user_attrs["epochs_completed"] == 3 and len(t.values) == 3

    store = Store(db_url, create=False)
    try:
        rows = {r["number"]: r for r in queries.trials(store, "e2e")}
        assert {n: r["state"] for n, r in rows.items()} == {t.number: t.state.name for t in study.trials}
        # Stored front == Optuna's best_trials; pruned/failed trials are never on it.
        snap, front = queries.pareto_front(store, "e2e")
        assert {p["trial_number"] for p in front} == {t.number for t in study.best_trials}
        assert all(rows[p["trial_number"]]["state"] == "COMPLETE" for p in front)
        assert snap["hypervolume"] > 0 and sum(p["is_knee"] for p in front) == 1
        assert len(queries.pareto_snapshots(store, "e2e")) == len(by_state[TrialState.COMPLETE])
        for t in by_state[TrialState.COMPLETE]:
            curve = queries.epoch_metrics(store, "e2e", t.number)
            assert [r["epoch"] for r in curve] == [1, 2, 3]
            assert curve[-1]["val_accuracy"] == pytest.approx(t.values[0])
            assert rows[t.number].values["val_accuracy"] == pytest.approx(t.values[0])
            assert 0 < rows[t.number].values["test_accuracy"] <= 1
            assert all("test" not in k for k in curve[0]["metrics"])  # measured once, at the end
            layers = queries.layer_records(store, "e2e", t.number)
            assert len(layers) >= 3 and layers[0]["w_bits"] == 8  # first layer at 8 bits
            assert all(r["w_bits"] == t.params["w_bits"] for r in layers[1:-1])
        # The two splits give different numbers; Optuna holds the validation one.
        assert any(rows[t.number].values["test_accuracy"] != pytest.approx(t.values[0])
                   for t in by_state[TrialState.COMPLETE])
        for t in by_state[TrialState.PRUNED]:
            assert len(queries.epoch_metrics(store, "e2e", t.number)) == t.user_attrs["pruned_at_epoch"]
            assert rows[t.number]["weights_path"] is None
        st = queries.list_studies(store)[0]
        assert st["status"] == "finished" and st["lease_host"] is None
    finally:
        store.dispose()

    # Relaunching a finished study runs nothing more.
    again = launch(spec, display=False)
    assert again.counted == 6 and len(optuna.load_study(study_name="e2e", storage=db_url).trials) == 6


@pytest.mark.timeout(240)
def test_a_search_that_fails_with_no_trial_running_stops_at_once(tmp_path, ray_session):
    """The searcher fails before any trial runs (a size bound no config meets): the study
    stops with that one error, promptly. Fails when the searcher answers None after a failure:
    with nothing running, Tune then re-asks it every second for up to 10 minutes, with no
    loop step in which the driver could stop it (seen with a database cut during ``ask``)."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    spec = parse_study_spec(tiny_spec("nofit", url, tmp_path,
                                      constraints={"size_mb": {"max": 1e-9}}))
    t0 = time.monotonic()
    with pytest.raises(QsearchError, match="in a row were infeasible"):
        launch(spec, display=False)
    assert time.monotonic() - t0 < 120
    study = optuna.load_study(study_name="nofit", storage=url)
    assert study.trials and all(t.state == TrialState.FAIL for t in study.trials)
    store = Store(url, create=False)
    try:
        assert queries.list_studies(store)[0]["lease_host"] is None  # the lease was released
    finally:
        store.dispose()


def test_resume_after_killed_driver_and_second_driver_refused(tmp_path, ray_session):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    data = tiny_spec("resume", url, tmp_path, budget={"num_trials": 4, "max_concurrent": 1})
    proc, log = start_driver(data, tmp_path, "--num-cpus", "1")
    try:
        def progress():
            states = [r["state"] for r in stored_trials(url, "resume")]
            return states.count("COMPLETE") >= 1 and "RUNNING" in states

        wait_for(progress, 240, "the first driver to finish a trial", proc, log)
        # A second driver on the live study is refused, naming the holder.
        with pytest.raises(LeaseError, match=rf"pid {proc.pid}"):
            launch(parse_study_spec(data), display=False)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=30)
        # It ran in WAL mode: its last commits are in the log, which the next opener recovers.
        assert (tmp_path / "q.db-wal").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    before = {t.number: t for t in optuna.load_study(study_name="resume", storage=url).trials}
    assert any(t.state == TrialState.RUNNING for t in before.values())
    result = launch(parse_study_spec(data), display=False)
    assert result.status == "finished"

    study = optuna.load_study(study_name="resume", storage=url)
    trials = study.trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    lost = [t for t in trials if not t.user_attrs.get("qsearch_counted", True)]
    assert lost and all(t.state == TrialState.FAIL and t.user_attrs["error"] == "driver lost"
                        for t in lost)
    assert {t.number for t in lost} == {n for n, t in before.items() if t.state == TrialState.RUNNING}
    counted = [t for t in trials if t.user_attrs.get("qsearch_counted", True)]
    assert len(counted) == 4
    # Trials finished by the first driver were kept, not re-run.
    for n, t in before.items():
        if t.state == TrialState.COMPLETE:
            assert study.trials[n].values == t.values
            assert study.trials[n].datetime_complete == t.datetime_complete
    store = Store(url, create=False)
    try:
        rows = queries.trials(store, "resume")
        assert sorted(r["number"] for r in rows) == [t.number for t in trials]
        assert not [r for r in rows if r["state"] == "RUNNING"]
        assert sum(r["counted"] for r in rows) == 4
    finally:
        store.dispose()


def test_ctrl_c_stops_cleanly(tmp_path):
    """SIGINT to a running driver: it stops, the trial it was running ends FAIL (not counted),
    nothing stays RUNNING, the lease is released, the driver says how to resume and exits 130;
    the relaunch finishes the budget with every trial number once."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    data = tiny_spec("ctrlc", url, tmp_path, budget={"num_trials": 6, "max_concurrent": 1})
    data["base"].update(epochs=6, batch_size=16)
    proc, log = start_driver(data, tmp_path, "--num-cpus", "1")
    try:
        wait_for(lambda: any(r["state"] == "RUNNING" and r["epochs_completed"] >= 1
                             for r in stored_trials(url, "ctrlc")),
                 240, "a running trial", proc, log)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130, log.read_text()[-3000:]
    trials = optuna.load_study(study_name="ctrlc", storage=url).trials
    assert trials and not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(trials) < 6, "the driver should have stopped before the budget"
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted and all(not t.user_attrs["qsearch_counted"] for t in interrupted)
    store = Store(url, create=False)
    try:
        assert not [r for r in queries.trials(store, "ctrlc") if r["state"] == "RUNNING"]
        st = queries.list_studies(store)[0]
        assert st["status"] == "stopped" and st["lease_host"] is None
    finally:
        store.dispose()

    proc, log = start_driver(data, tmp_path, "--num-cpus", "1")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="ctrlc", storage=url)
    counted = [t for t in study.trials if t.user_attrs.get("qsearch_counted", True)
               and t.state != TrialState.RUNNING]
    assert len(counted) == 6
    numbers = [r["number"] for r in stored_trials(url, "ctrlc")]
    assert len(numbers) == len(set(numbers)) == len(study.trials)


@pytest.mark.postgres
def test_database_gone_for_good_stops_the_study_cleanly_then_it_resumes(pg_url, tmp_path,
                                                                        monkeypatch):
    """The database refuses every connection mid-study, past all retries: the driver stops
    with one clear storage error (exit 2, no traceback) rather than taking it for a trial
    failure and restarting a trial Optuna already knows; once the database is back, a
    relaunch finishes the study with every trial recorded once."""
    import psycopg
    from _search_helpers import PG_ADMIN

    monkeypatch.setenv("QSEARCH_DB_RETRIES", "2")  # give up within seconds
    dbname = pg_url.rsplit("/", 1)[1]
    data = tiny_spec("gone", pg_url, tmp_path, budget={"num_trials": 3, "max_concurrent": 1})
    data["base"].update(epochs=4)
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    proc, log = start_driver(data, tmp_path, "--num-cpus", "1")
    try:
        wait_for(lambda: [r for r in stored_trials(pg_url, "gone") if r["state"] == "COMPLETE"],
                 240, "a finished trial", proc, log)
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        rc = proc.wait(timeout=180)
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        admin.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    assert rc == 2, text[-3000:]
    assert last.startswith("error:") and dbname in last, text[-3000:]
    assert "Traceback" not in text and "restart" not in text, text[-3000:]

    proc, log = start_driver(data, tmp_path, "--num-cpus", "1")
    try:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    trials = optuna.load_study(study_name="gone", storage=pg_url).trials
    counted = [t for t in trials if t.state.is_finished() and t.user_attrs["qsearch_counted"]]
    assert len(counted) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    rows = stored_trials(pg_url, "gone")
    assert sorted(r["number"] for r in rows) == sorted(t.number for t in trials)
    assert {r["number"]: r["state"] for r in rows} == {t.number: t.state.name for t in trials}
