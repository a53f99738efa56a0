"""The SQL store on SQLite and PostgreSQL: schema, lease, trial rows, queries, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta

import optuna
import pytest
from sqlalchemy import create_engine, inspect, text, update
from sqlalchemy.exc import OperationalError, PendingRollbackError

from qsearch.errors import StorageError
from qsearch.store import LeaseError, Store, queries, utcnow
from qsearch.store import schema as s


def _study(store, name="st"):
    rec, created = store.create_or_get_study(
        name, spec_yaml="name: st\n", spec_hash="h" * 64, search_hash="g" * 64,
        objectives=["accuracy", "size_mb"], directions=["maximize", "minimize"],
        artifacts_dir="/tmp/a")
    return rec, created


def test_schema_beside_optuna_and_created_once(db_url):
    optuna.create_study(study_name="o", storage=db_url,
                        directions=["maximize", "minimize"])
    stores = []
    errors = []

    def open_store():
        try:
            stores.append(Store(db_url))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    eng = create_engine(stores[0].sqlalchemy_url)
    try:
        tables = set(inspect(eng).get_table_names())
        with eng.connect() as c:
            alembic = c.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            versions = c.execute(text("SELECT version FROM qsearch_schema_version")).scalars().all()
    finally:
        eng.dispose()
    ours = {t for t in tables if t.startswith("qsearch_")}
    assert ours == {t.name for t in s.ALL_TABLES}
    assert "studies" in tables and "trials" in tables  # Optuna's, untouched
    assert len(alembic) == 1 and versions == [s.SCHEMA_VERSION]
    for st in stores:
        st.dispose()


def test_lease_refuse_stale_takeover_and_release(db_url):
    store = Store(db_url)
    rec, created = _study(store)
    assert created and not _study(store)[1]
    token = store.acquire_lease(rec.id, host="node-a", pid=4242)
    with pytest.raises(LeaseError, match=r"host node-a, pid 4242"):
        store.acquire_lease(rec.id, host="node-b", pid=1)
    assert store.heartbeat(rec.id, token)
    # A heartbeat older than the timeout: another driver may take over ...
    with store.tx("age lease") as c:
        c.execute(update(s.studies).values(lease_heartbeat_at=utcnow() - timedelta(seconds=120)))
    token_b = store.acquire_lease(rec.id, host="node-b", pid=1)
    # ... and the old holder learns it lost the lease.
    assert not store.heartbeat(rec.id, token)
    assert store.heartbeat(rec.id, token_b)
    store.release_lease(rec.id, token_b, "stopped")
    st = queries.list_studies(store)[0]
    assert st["lease_host"] is None and st["status"] == "stopped"
    store.dispose()


def test_dead_pid_on_this_host_is_taken_over_at_once(db_url):
    store = Store(db_url)
    rec, _ = _study(store)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    store.acquire_lease(rec.id, pid=p.pid)  # this host, a pid that has exited
    store.acquire_lease(rec.id)  # fresh heartbeat, but the holder is gone
    with pytest.raises(LeaseError, match="pid"):
        store.acquire_lease(rec.id, host="elsewhere", pid=7)
    store.dispose()


def test_trial_rows_and_queries(db_url):
    store = Store(db_url)
    rec, _ = _study(store)
    store.trial_started(rec.id, 0, optuna_trial_id=1, params={"w_bits": 2},
                        config={"w_bits": 2}, max_epochs=2)
    for e in (1, 2):
        store.record_epoch(rec.id, 0, {"epoch": e, "accuracy": 0.5 + e / 10, "size_mb": 0.1,
                                       "lts.frozen_fraction": 0.3, "train_loss": float("nan")})
    store.record_epoch(rec.id, 0, {"epoch": 2, "accuracy": 0.75, "size_mb": 0.1})  # idempotent
    layers = [{"name": "conv1", "kind": "conv", "params": 10, "macs": 100, "w_bits": 8,
               "a_bits": 8, "g_bits": 32, "frozen_fraction": 0.0},
              {"name": "fc", "kind": "linear", "params": 5, "macs": 5, "w_bits": 2,
               "a_bits": 2, "g_bits": 32, "frozen_fraction": 0.5}]
    store.trial_finished(rec.id, 0, state="COMPLETE", detail="finished", counted=True,
                         values={"accuracy": 0.75, "size_mb": 0.1}, epochs_completed=2,
                         layers=layers, weights_path="/tmp/w.pt")
    snap = store.write_snapshot(rec.id, trigger_trial=0, n_complete=1, hypervolume=0.5,
                                reference_point={"accuracy": 0.0, "size_mb": 1.0},
                                points=[{"trial_number": 0, "accuracy": 0.75, "size_mb": 0.1,
                                         "is_knee": True}])
    assert snap == 1
    t = queries.trial(store, "st", 0)
    assert (t["state"], t["epochs_completed"], t["accuracy"], t["params"]) == \
        ("COMPLETE", 2, 0.75, {"w_bits": 2})
    curve = queries.epoch_metrics(store, "st", 0)
    assert [r["epoch"] for r in curve] == [1, 2] and curve[1]["accuracy"] == 0.75
    assert curve[0]["metrics"]["lts.frozen_fraction"] == 0.3 and curve[0]["train_loss"] is None
    assert [r["name"] for r in queries.layer_records(store, "st", 0)] == ["conv1", "fc"]
    snap_row, points = queries.pareto_front(store, "st")
    assert snap_row["reference_point"] == {"accuracy": 0.0, "size_mb": 1.0}
    assert [p["trial_number"] for p in points] == [0] and points[0]["is_knee"]
    assert queries.pareto_snapshots(store, "st")[0]["hypervolume"] == 0.5
    assert queries.list_studies(store)[0]["trials"]["COMPLETE"] == 1
    store.dispose()


def test_unreachable_database_masks_the_password():
    with pytest.raises(StorageError) as e:
        Store("postgresql+psycopg://alice:s3cret@127.0.0.1:1/nodb")
    msg = str(e.value)
    assert "s3cret" not in msg and "alice:***@127.0.0.1:1/nodb" in msg
    assert e.value.__cause__ is not None


def test_unknown_study_is_a_clear_error(db_url):
    from qsearch.errors import ConfigError

    store = Store(db_url)
    _study(store, "known")
    with pytest.raises(ConfigError, match="known studies: known"):
        queries.trials(store, "missing")
    store.dispose()


@pytest.mark.postgres
def test_transient_error_is_retried_on_a_fresh_connection(pg_url):
    """The server kills the connection in the middle of a transaction: the whole
    transaction is retried on a new connection; a real error is not retried."""
    import psycopg
    from _search_helpers import PG_ADMIN

    from qsearch.store import with_retries

    store = Store(pg_url)
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    pids: list[int] = []

    def op() -> int:
        with store.tx("probe") as conn:
            pids.append(conn.execute(text("SELECT pg_backend_pid()")).scalar())
            if len(pids) == 1:
                admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
            return conn.execute(text("SELECT 41 + 1")).scalar()

    try:
        assert with_retries("probe", op) == 42
        assert len(pids) == 2 and pids[0] != pids[1]

        calls: list[int] = []

        def broken() -> None:
            calls.append(1)
            with store.tx("broken") as conn:
                conn.execute(text("SELECT * FROM no_such_table"))

        with pytest.raises(StorageError, match="no_such_table"):
            with_retries("broken", broken)
        assert calls == [1]
    finally:
        admin.close()
        store.dispose()


@pytest.mark.postgres
def test_session_reused_after_its_connection_died_is_retried(pg_url):
    """Optuna's RDB storage, after a query fails because the server killed the connection,
    tries another query in the same session: SQLAlchemy then raises PendingRollbackError,
    and Optuna wraps that in StorageInternalError. That is the same outage, so it is
    retried (on a fresh session), not passed up as a hard failure."""
    import psycopg
    from _search_helpers import PG_ADMIN
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.orm import Session

    from qsearch.store import is_transient, with_retries

    eng = create_engine(pg_url)
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    attempts: list[int] = []

    def optuna_like_read() -> int:
        session = Session(eng)
        try:
            attempts.append(1)
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
            if len(attempts) == 1:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                for _ in range(100):  # the signal is asynchronous: wait until it is gone
                    if admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                     (pid,)).fetchone() is None:
                        break
                    time.sleep(0.05)
                try:
                    try:
                        session.execute(text("SELECT 1"))
                    except OperationalError:  # Optuna: "falling back to a slower alternative"
                        session.execute(text("SELECT 1"))  # in the same session
                except PendingRollbackError as e:
                    raise StorageInternalError("An exception is raised during the commit.") from e
            return session.execute(text("SELECT 41 + 1")).scalar()
        finally:
            # Closing rolls back on the dead connection; whether psycopg has noticed the
            # termination by then is a race, so that error is not the one under test.
            try:
                session.close()
            except OperationalError:
                pass

    try:
        with pytest.raises(StorageInternalError) as got:
            optuna_like_read()
        assert isinstance(got.value.__cause__, PendingRollbackError)
        assert is_transient(got.value)
        attempts.clear()
        assert with_retries("optuna-like read", optuna_like_read) == 42
        assert len(attempts) == 2
    finally:
        admin.close()
        eng.dispose()


@pytest.mark.postgres
def test_queries_are_retried_and_nested_retries_do_not_multiply(pg_url):
    """The driver reads the front through ``queries`` mid-study: a connection the server
    kills under a query is retried on a fresh one. A retried query made of retried store
    calls repeats as a whole, so ``retries`` bounds the attempts, not ``retries`` squared."""
    import psycopg
    from _search_helpers import PG_ADMIN
    from sqlalchemy import event

    store = Store(pg_url)
    rec, _ = _study(store)
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    kills = {"table": "", "left": 0, "done": 0}

    @event.listens_for(store.engine, "before_cursor_execute")
    def kill_own_backend(conn, _cursor, statement, *_args):
        if f"FROM {kills['table']} " in statement + " " and kills["left"] > 0:
            kills["left"] -= 1
            kills["done"] += 1
            pid = conn.connection.dbapi_connection.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    try:
        kills.update(table="qsearch_trials", left=1)
        assert queries.complete_values(store, rec.id) == []
        assert kills["done"] == 1

        store.retries = 1
        kills.update(table="qsearch_studies", left=10, done=0)
        with pytest.raises(StorageError, match="unreachable|refused"):
            queries.trials(store, "st")  # require_study -> get_study, each retried alone
        assert kills["done"] == 2  # 1 + 1 retry of the whole query
    finally:
        admin.close()
        store.dispose()


def test_half_created_schema_is_not_reported_as_present(db_url):
    """A reader polling while a driver creates the schema (pysqlite commits each CREATE TABLE
    on its own) must not take the version table alone for a usable store."""
    eng = create_engine(db_url)
    try:
        s.schema_version.create(eng)
        half = Store(db_url, create=False)
        try:
            assert half.has_schema() is False
            half.ensure_schema()
            assert half.has_schema() is True and half.get_study("none") is None
        finally:
            half.dispose()
    finally:
        eng.dispose()


def test_v1_schema_is_upgraded_in_place(db_url):
    """A database made by qsearch schema v1 (no retries/placement columns) is upgraded
    when a newer qsearch opens it; its rows are kept."""
    store = Store(db_url)
    rec, _ = _study(store)
    store.trial_started(rec.id, 0, optuna_trial_id=1, params={}, config={}, max_epochs=1)
    with store.engine.begin() as c:
        for col in ("retries", "placement"):
            c.execute(text(f"ALTER TABLE qsearch_trials DROP COLUMN {col}"))
        c.execute(text("UPDATE qsearch_schema_version SET version = 1"))
    store.dispose()

    store = Store(db_url)
    try:
        with store.engine.connect() as c:
            assert c.execute(text("SELECT version FROM qsearch_schema_version")).scalar() == \
                s.SCHEMA_VERSION
        cols = {col["name"] for col in inspect(store.engine).get_columns("qsearch_trials")}
        assert {"retries", "placement"} <= cols
        assert store.trial_retried(rec.id, 0) == 1
        store.set_placement(rec.id, 0, {"node_id": "n1", "gpu_ids": ["0"]})
        row = queries.trial(store, "st", 0)
        assert row["retries"] == 1 and row["placement"]["gpu_ids"] == ["0"]
    finally:
        store.dispose()


# --------------------------------------------------------------------------- schema v2 -> v3

V2_SQLITE_DDL_SHA256 = "a6db706bd422380436cba8258fb63cbe18fe37c9a2ec7d55359d6ef56fab4a0e"


def _ddl(url: str) -> str:
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return "\n".join(str(r[0]) for r in c.execute(text(
                "SELECT sql FROM sqlite_master WHERE name LIKE 'qsearch_%' ORDER BY name")))
    finally:
        eng.dispose()


def test_v2_fixture_is_the_schema_the_old_code_made(tmp_path):
    """The inline v2 tables of ``_schema_v2`` produce, on SQLite, byte for byte the DDL that
    qsearch cfa4bba's ``Store`` created (its hash was taken from a store that code made)."""
    import hashlib

    import _schema_v2 as v2

    url = f"sqlite:///{tmp_path / 'v2.db'}"
    eng = create_engine(url)
    v2.metadata.create_all(eng)
    eng.dispose()
    assert hashlib.sha256(_ddl(url).encode()).hexdigest() == V2_SQLITE_DDL_SHA256


def _cli_json(capsys, *args):
    from qsearch.cli import main

    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_v2_store_is_read_upgraded_resumed_and_exported(db_url, tmp_path, capsys):
    """A store written by schema v2 (values as columns): readers see its values by name
    before any upgrade; a v3 Store upgrades it in place (old columns kept, values copied
    under their old names); the study resumes (lease, a new trial, a front re-drawn over
    old and new trials); an old trial exports; ``qsearch pareto`` prints it all."""
    import _schema_v2 as v2

    from qsearch.config.objectives import get_objective, objective_names
    from qsearch.export import export_trial, select_trial
    from qsearch.search.front import update_snapshot
    from qsearch.store import Database, objective_values

    v2.build_v2_store(db_url, tmp_path / "artifacts")
    by_n = {t[0]: t for t in v2.TRIALS}

    # 1. A reader (never upgrades) on the untouched v2 store.
    reader = Database(db_url, must_exist=True)
    assert queries.trial(reader, v2.STUDY, 0).values == {
        "accuracy": 0.91, "size_mb": 0.20, "backward_cost": 0.60, "bops": 1.0e6}
    doc = _cli_json(capsys, "pareto", v2.STUDY, "--storage", db_url, "--format", "json")
    assert [p["trial_number"] for p in doc["points"]] == v2.FRONT
    reader.dispose()

    # 2. The v3 writer upgrades it.
    store = Store(db_url)
    try:
        with store.engine.connect() as c:
            assert c.execute(text("SELECT version FROM qsearch_schema_version")).scalar() == 3
        cols = {col["name"] for col in inspect(store.engine).get_columns("qsearch_trials")}
        assert set(s.LEGACY_TRIAL_VALUES) <= cols  # kept for older readers
        for n, state, acc, size, bwd, bops in v2.TRIALS:
            row = queries.trial(store, v2.STUDY, n)
            want = {} if state != "COMPLETE" else {
                "accuracy": acc, "size_mb": size, "backward_cost": bwd, "bops": bops}
            assert row.values == want
        if "backward_bops" in objective_names():  # the new name finds the old one
            assert queries.trial(store, v2.STUDY, 0).value("backward_bops") == 0.60
        snap, front = queries.pareto_front(store, v2.STUDY)
        assert snap.snapshot == 2 and [p.trial_number for p in front] == v2.FRONT
        assert front[1].values == {"accuracy": 0.85, "size_mb": 0.05, "backward_cost": 0.40}
        assert front[1].is_knee and front[0].params == {"w_bits": 2, "lr": 0.01}
        assert [sn.hypervolume for sn in queries.pareto_snapshots(store, v2.STUDY)] == [0.1, 0.3]

        # 3. Resume: same study row, the lease, one more trial, a new front over all.
        rec, created = store.create_or_get_study(
            v2.STUDY, spec_yaml="name: old\n", spec_hash="a" * 64, search_hash="b" * 64,
            objectives=v2.OBJECTIVES, directions=v2.DIRECTIONS, artifacts_dir="/x")
        assert not created and rec.objectives == v2.OBJECTIVES
        token = store.acquire_lease(rec.id)
        store.trial_started(rec.id, 4, optuna_trial_id=5, params={"w_bits": 6, "lr": 0.02},
                            config={"w_bits": 6}, max_epochs=2)
        final = {"epoch": 2, "accuracy": 0.95, "size_mb": 0.10, "backward_cost": 0.50,
                 "test_accuracy": 0.94, "train_loss": 0.1}
        store.trial_finished(rec.id, 4, state="COMPLETE", detail="finished", counted=True,
                             values=objective_values(final), epochs_completed=2)
        new = update_snapshot(store, rec.id, rec.objectives, rec.directions, trigger_trial=4)
        store.release_lease(rec.id, token, "finished")
        assert new["snapshot"] == 3
        # trial 4 dominates trial 0; trial 1 stays (smallest)
        assert sorted(p["trial_number"] for p in new["points"]) == [1, 4]
        row4 = queries.trial(store, v2.STUDY, 4)
        assert row4.value("accuracy") == 0.95 and "train_loss" not in row4.values
        if "test_accuracy" in objective_names():
            assert row4.values["test_accuracy"] == 0.94

        # 4. Export an old front trial (its weights are where v2 left them).
        number = select_trial(store, v2.STUDY, rule="min-size")
        assert number == 1
        exported = export_trial(store, v2.STUDY, number, tmp_path / "e" / "t1.json")
        assert exported["objectives"]["accuracy"] == by_n[1][2]
        assert exported["objectives"]["backward_cost"] == by_n[1][4]
        assert (tmp_path / "e" / "t1.pt").read_bytes() == b"weights of trial 1"
    finally:
        store.dispose()

    # 5. The CLI reads the upgraded store: names, labels, directions, params.
    doc = _cli_json(capsys, "pareto", v2.STUDY, "--storage", db_url, "--format", "json")
    assert doc["snapshot"] == 3
    assert [o["name"] for o in doc["objectives"]] == v2.OBJECTIVES
    for o in doc["objectives"]:
        reg = get_objective(o["name"])
        assert (o["label"], o["unit"], o["direction"]) == (reg.label, reg.unit, reg.direction)
    pts = {p["trial_number"]: p for p in doc["points"]}
    assert sorted(pts) == [1, 4]
    assert pts[4]["accuracy"] == 0.95 and pts[4]["params"] == {"w_bits": 6, "lr": 0.02}
    assert pts[1]["params"] == {"w_bits": 3, "lr": 0.01}
    from qsearch.cli import main

    capsys.readouterr()
    assert main(["pareto", v2.STUDY, "--storage", db_url, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trial_number,accuracy,size_mb,backward_cost,is_knee,")
    assert lines[0].endswith(",params") and len(lines) == 3
    assert main(["status", v2.STUDY, "--storage", db_url]) == 0
    out = capsys.readouterr().out
    assert "accuracy↑" in out and get_objective("size_mb").axis_title in out


# --------------------------------------------------------------------------- the registry


@pytest.fixture
def test_obj():
    from qsearch.config.objectives import Objective, register_objective, unregister_objective

    obj = register_objective(Objective("test_obj", "minimize", "test objective", unit="widgets",
                                       kind="computed"))
    yield obj
    unregister_objective(obj.name)


def test_a_registered_objective_reaches_the_store_and_the_cli(db_url, test_obj, capsys):
    """An objective registered here, in a test file, goes through the store and ``qsearch
    pareto`` with no product code naming it; an unregistered metric is not stored."""
    from qsearch.search.front import update_snapshot
    from qsearch.store import objective_values

    store = Store(db_url)
    try:
        rec, _ = store.create_or_get_study(
            "reg", spec_yaml="", spec_hash="h" * 64, search_hash="g" * 64,
            objectives=["size_mb", "test_obj"], directions=["minimize", "minimize"],
            artifacts_dir="/tmp/a")
        for n, (size, obj) in enumerate([(0.1, 5.0), (0.2, 1.0), (0.3, 6.0)]):
            store.trial_started(rec.id, n, optuna_trial_id=n, params={"k": n}, config={},
                                max_epochs=1)
            final = {"epoch": 1, "size_mb": size, "test_obj": obj, "not_registered": 7.0}
            store.trial_finished(rec.id, n, state="COMPLETE", detail="finished", counted=True,
                                 values=objective_values(final) | {"not_registered": 7.0})
            update_snapshot(store, rec.id, rec.objectives, rec.directions, trigger_trial=n)
        assert queries.trial(store, "reg", 1).values == {"size_mb": 0.2, "test_obj": 1.0}
        _, front = queries.pareto_front(store, "reg")
        assert [(p.trial_number, p.values["test_obj"]) for p in front] == [(0, 5.0), (1, 1.0)]
    finally:
        store.dispose()
    doc = _cli_json(capsys, "pareto", "reg", "--storage", db_url, "--format", "json")
    info = {o["name"]: o for o in doc["objectives"]}["test_obj"]
    assert (info["label"], info["unit"], info["direction"], info["registered"]) == \
        ("test objective", "widgets", "minimize", True)
    assert [(p["trial_number"], p["test_obj"], p["params"]) for p in doc["points"]] == \
        [(0, 5.0, {"k": 0}), (1, 1.0, {"k": 1})]
