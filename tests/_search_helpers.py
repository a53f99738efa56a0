"""Fixtures shared by the search-service tests: fresh SQLite/PostgreSQL databases, one Ray
runtime per test session, and a tiny study spec factory.

PostgreSQL tests get their own database (``qs_test_<uuid>``, dropped afterwards) on
127.0.0.1:5432; if the server is unreachable they are skipped, except under ``CI=true``
where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

PG_ADMIN = os.environ.get("QSEARCH_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def _pg_admin():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN} is unreachable under CI=true: {e}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN} unreachable: {e}")


@pytest.fixture
def pg_url():
    """URL of a brand-new PostgreSQL database, dropped after the test."""
    admin = _pg_admin()
    name = f"qs_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qsearch.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime (2 CPUs) for the whole test session."""
    import ray

    from qsearch.search.driver import init_ray

    started = not ray.is_initialized()
    init_ray(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def tiny_spec(name: str, storage: str, tmp_path: Path, **over: Any) -> dict[str, Any]:
    """A study of digits/tiny-cnn trials that take a few seconds each."""
    spec: dict[str, Any] = {
        "name": name,
        "storage": storage,
        "base": {"epochs": 3, "device": "cpu", "warm_start": {"epochs": 2}},
        "objectives": ["accuracy", "size_mb", "backward_cost"],
        "budget": {"num_trials": 4, "max_concurrent": 1},
        "resources": {"cpu": 1},
        "sampler": {"type": "random", "seed": 0},
        "scheduler": {"type": "none"},
        "search_space": {
            "w_bits": {"type": "categorical", "choices": [2, 4, 8]},
            "lr": {"type": "float", "low": 0.002, "high": 0.05, "log": True},
        },
        "artifacts": {"dir": str(tmp_path / "artifacts")},
    }
    spec.update(over)
    return spec


def start_driver(spec: dict[str, Any], tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """``qsearch launch SPEC --quiet ARGS`` as its own process group (so a test can kill it
    with the local Ray it starts); returns the process and its stderr log."""
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp_path / f"{spec['name']}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from qsearch.cli import entry; entry()", "launch", str(path),
             "--quiet", *args],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log


def stored_trials(url: str, study: str) -> list[dict[str, Any]]:
    """The study's trial rows, or [] while the driver has not created them yet."""
    from qsearch.errors import ConfigError
    from qsearch.store import Store, queries

    try:
        store = Store(url, create=False)
    except ConfigError:  # no SQLite file yet (and a reader never creates one)
        return []
    try:
        if not store.has_schema() or store.get_study(study) is None:
            return []
        return queries.trials(store, study)
    finally:
        store.dispose()


def wait_for(cond: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy (which is returned); fail on timeout or
    when ``proc`` (the driver being watched) ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the driver ended while waiting for {what}:\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
