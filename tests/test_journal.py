"""SQLite's journal around a running study (qsearch/store/journal.py), on real SQLite files."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from sqlalchemy import text

from qsearch.store import Store, optuna_storage
from qsearch.store.journal import (
    NETWORK_FILESYSTEMS,
    WalWhileRunning,
    filesystem_type,
    journal_mode,
    wal_decision,
)

MOUNTINFO = """\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
40 22 0:38 / /mnt/shared rw,relatime shared:20 - nfs4 fs1:/export rw,vers=4.2
41 40 0:39 / /mnt/shared/scratch rw,relatime shared:21 - tmpfs tmpfs rw
42 22 0:40 / /home/a\\040b rw - lustre 10.0.0.1@tcp:/lfs rw
"""


@pytest.fixture
def study_file(tmp_path, monkeypatch):
    monkeypatch.delenv("QSEARCH_SQLITE_WAL", raising=False)
    path = tmp_path / "q.db"
    store = Store(f"sqlite:///{path}")  # the qsearch tables, as a driver creates them
    store.dispose()
    return path


def _running(path: Path) -> tuple[Store, WalWhileRunning, optuna.storages.BaseStorage]:
    """What the driver does when it holds the lease: switch, then open its connections."""
    store = Store(f"sqlite:///{path}")
    wal = WalWhileRunning(store.engine)
    store.engine.dispose()
    wal.start()
    return store, wal, optuna_storage(store)


def _synchronous(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("PRAGMA synchronous")).scalar_one()


def test_filesystem_type_is_the_longest_mount_prefix():
    assert filesystem_type(Path("/home/u/q.db"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/mnt/shared/team/q.db"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/mnt/shared/scratch/q.db"), MOUNTINFO) == "tmpfs"
    assert filesystem_type(Path("/mnt/sharedx/q.db"), MOUNTINFO) == "ext4"  # not a prefix
    assert filesystem_type(Path("/home/a b/q.db"), MOUNTINFO) == "lustre"  # escaped space
    assert {"nfs4", "lustre"} <= NETWORK_FILESYSTEMS and "ext4" not in NETWORK_FILESYSTEMS


def test_wal_decision_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QSEARCH_SQLITE_WAL", raising=False)
    use, why = wal_decision(tmp_path / "q.db")
    assert use, why  # the test folder is on a local disk
    monkeypatch.setenv("QSEARCH_SQLITE_WAL", "0")
    assert wal_decision(tmp_path / "q.db") == (False, "QSEARCH_SQLITE_WAL=off")
    monkeypatch.setenv("QSEARCH_SQLITE_WAL", "1")
    assert wal_decision(tmp_path / "q.db") == (True, "QSEARCH_SQLITE_WAL=on")


def test_a_running_study_is_in_wal_and_a_reader_does_not_block_its_commits(study_file):
    """The point of WAL for a study: a dashboard in the middle of a read transaction does not
    hold up the driver's commit (in the rollback journal the commit fails after its timeout),
    and both of the driver's engines commit without a disk sync. Fails when the switch is
    skipped or the connect hook is not on Optuna's engine."""
    store, wal, storage = _running(study_file)
    try:
        assert journal_mode(study_file) == "wal"
        assert _synchronous(store.engine) == 1  # NORMAL
        assert _synchronous(storage.inner.engine) == 1

        reader = sqlite3.connect(study_file, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM qsearch_studies").fetchone()  # holds a snapshot
        writer = sqlite3.connect(study_file, timeout=0.5)
        writer.execute("CREATE TABLE t (x)")
        writer.execute("INSERT INTO t VALUES (1)")
        writer.commit()  # raises "database is locked" under the rollback journal
        writer.close()
        reader.execute("COMMIT")
        reader.close()
    finally:
        store.dispose()
        storage.dispose()
        wal.restore()


def test_a_stopped_study_is_one_self_contained_file(study_file, tmp_path):
    """After the driver: the rollback journal again, no side files, and the ``.db`` copied alone
    holds every trial. Fails when restore is skipped (the file stays in WAL mode, which a
    read-only folder cannot open) or runs before the engines are closed."""
    store, wal, storage = _running(study_file)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    for i in range(5):
        t = study.ask()
        t.set_user_attr("k", i)
        study.tell(t, float(i))
    store.dispose()
    storage.dispose()
    assert wal.restore()
    assert journal_mode(study_file) == "delete"
    assert sorted(p.name for p in study_file.parent.iterdir() if p.name.startswith("q.db")) \
        == ["q.db"]
    copy = tmp_path / "copy" / "q.db"
    copy.parent.mkdir()
    shutil.copy(study_file, copy)
    loaded = optuna.load_study(study_name="s", storage=f"sqlite:///{copy}")
    assert [t.value for t in loaded.trials] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [t.user_attrs["k"] for t in loaded.trials] == [0, 1, 2, 3, 4]


def test_a_reader_still_open_keeps_wal_and_loses_nothing(study_file):
    store, wal, storage = _running(study_file)
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    study.enqueue_trial({})
    t = study.ask()
    study.tell(t, 1.0)
    store.dispose()
    storage.dispose()
    reader = sqlite3.connect(study_file)
    reader.execute("SELECT count(*) FROM trials").fetchone()
    assert not wal.restore()  # the dashboard holds the file: no wait, no error
    assert journal_mode(study_file) == "wal"
    reader.close()
    check = optuna.storages.RDBStorage(f"sqlite:///{study_file}")
    assert optuna.load_study(study_name="s", storage=check).trials[0].value == 1.0
    check.engine.dispose()
    store, wal, storage = _running(study_file)  # the next driver switches it back
    store.dispose()
    storage.dispose()
    assert wal.restore() and journal_mode(study_file) == "delete"


def test_wal_off_keeps_the_rollback_journal(study_file, monkeypatch):
    conn = sqlite3.connect(study_file)  # left in WAL, as by a driver killed mid-study
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    monkeypatch.setenv("QSEARCH_SQLITE_WAL", "0")
    store, wal, storage = _running(study_file)
    try:
        assert journal_mode(study_file) == "delete"
        assert _synchronous(store.engine) == 2  # FULL, SQLite's default
    finally:
        store.dispose()
        storage.dispose()
        assert not wal.restore()


@pytest.mark.parametrize("url", ["sqlite://", pytest.param("pg", marks=pytest.mark.postgres)])
def test_in_memory_and_postgres_databases_are_left_alone(url, request):
    store = Store(request.getfixturevalue("pg_url") if url == "pg" else url)
    try:
        assert not WalWhileRunning(store.engine).start()
    finally:
        store.dispose()
