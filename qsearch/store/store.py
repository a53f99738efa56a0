"""The SQL store: engine, schema creation, and every write the driver makes.

One :class:`Store` per database URL. Each public method is one transaction; any SQLAlchemy
error is wrapped in :class:`~qsearch.errors.StorageError` (chained ``from e``) whose message
names the URL with the password masked. Only the study driver writes; Ray workers report
through Ray Tune. Read functions for the CLI and dashboards live in :mod:`qsearch.store.queries`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Connection, create_engine, delete, event, inspect, select, text, update
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    SQLAlchemyError,
)

from qsearch.errors import ConfigError, StorageError
from qsearch.store import schema as s

log = logging.getLogger(__name__)
LEASE_STALE_S = float(os.environ.get("QSEARCH_LEASE_TIMEOUT_S", "60"))
#: Transient database errors (a dropped connection, a failover, SQLite's write lock held too
#: long) are retried this many times, with exponential back-off and full jitter.
DB_RETRIES = int(os.environ.get("QSEARCH_DB_RETRIES", "6"))
DB_RETRY_BASE_S = float(os.environ.get("QSEARCH_DB_RETRY_BASE_S", "0.2"))
DB_RETRY_MAX_S = 5.0
#: Any constant: the PostgreSQL advisory lock that serialises schema creation and upgrades.
_SCHEMA_LOCK_KEY = 0x71736561  # "qsea"
_OPTIONAL_METRIC_COLUMNS = ("accuracy", "size_mb", "backward_cost", "bops", "train_loss",
                            "test_loss", "wall_s")


class LeaseError(StorageError):
    """Another live driver holds the study (message names its host and pid)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable URL>"


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON: numbers stay numbers, NaN/inf become None, others become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = v if isinstance(v, int) else _finite(v)
        else:
            out[k] = str(v)
    return out


@dataclass
class StudyRecord:
    id: int
    name: str
    status: str
    spec_yaml: str
    spec_hash: str
    search_hash: str
    objectives: list[str]
    directions: list[str]
    artifacts_dir: str | None
    created_at: datetime
    finished_at: datetime | None
    lease_host: str | None
    lease_pid: int | None
    lease_heartbeat_at: datetime | None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prefer_psycopg3(url: Any) -> Any:
    """``postgresql://`` means psycopg2 to SQLAlchemy; use psycopg 3 when that is installed."""
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("", "psycopg2"):
        with contextlib.suppress(ImportError):
            import psycopg  # noqa: F401

            return url.set(drivername="postgresql+psycopg")
    return url


def engine_kwargs(backend: str) -> dict[str, Any]:
    """Engine settings for a long-running driver, shared by qsearch's and Optuna's engines.

    ``pool_pre_ping`` replaces connections the server dropped while they sat in the pool
    (restarts, ``pg_terminate_backend``, idle timeouts). On PostgreSQL the pool is bounded
    (``QSEARCH_DB_POOL_SIZE`` + ``QSEARCH_DB_MAX_OVERFLOW`` connections per engine; a driver
    has two engines) and connections are recycled before typical proxy idle limits.
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        # Driver and Optuna share the file; wait for the other's write lock, not fail.
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs.update(pool_size=int(os.environ.get("QSEARCH_DB_POOL_SIZE", "5")),
                      max_overflow=int(os.environ.get("QSEARCH_DB_MAX_OVERFLOW", "5")),
                      pool_timeout=30, pool_recycle=1800)
    return kwargs


def is_transient(exc: BaseException) -> bool:
    """A database error that a retry on a fresh connection can fix (also when wrapped, as
    in StorageError or Optuna's StorageInternalError)."""
    cause = exc if isinstance(exc, SQLAlchemyError) else exc.__cause__
    if isinstance(cause, PendingRollbackError):
        # A session reused after its connection died under it (Optuna's RDB storage retries
        # a failed query in the same session): the error is the death, not the reuse.
        died = cause.__context__
        if isinstance(died, SQLAlchemyError):
            return is_transient(died)
        return "can't reconnect until invalid transaction" in str(cause).lower()
    if isinstance(cause, DBAPIError) and cause.connection_invalidated:
        return True
    if isinstance(cause, OperationalError):
        if type(cause.orig).__module__.startswith("sqlite3"):
            # SQLite reports most errors (a missing table, bad SQL) as OperationalError too;
            # only a held lock is worth waiting for.
            return any(w in str(cause.orig).lower() for w in ("locked", "busy"))
        return True  # connection lost/refused, server shutting down, failover
    return isinstance(cause, InterfaceError)


_retrying = threading.local()


def with_retries(what: str, fn: Callable[[], Any], attempts: int | None = None) -> Any:
    """Call ``fn`` (one whole unit of work), retrying transient errors with jittered
    exponential back-off; the last error propagates.

    Only the outermost call in a thread retries: a retried unit made of retried parts
    (a query that reads the study, then its trials) repeats as a whole, and the attempts do
    not multiply."""
    if getattr(_retrying, "active", False):
        return fn()
    n = DB_RETRIES if attempts is None else attempts
    _retrying.active = True
    try:
        for attempt in range(n + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - is_transient decides; the rest propagates
                if attempt == n or isinstance(e, LeaseError) or not is_transient(e):
                    raise
                delay = random.uniform(0, min(DB_RETRY_MAX_S, DB_RETRY_BASE_S * 2 ** attempt))
                log.warning("%s: transient database error (%s); retry %d/%d in %.2f s", what,
                            str(e).splitlines()[0][:200], attempt + 1, n, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        _retrying.active = False


def retried(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a Store method, or a function whose first argument is the Store (the
    read queries): the whole call is retried on transient errors, ``store.retries`` times."""

    @functools.wraps(fn)
    def wrapper(store: Store, *args: Any, **kwargs: Any) -> Any:
        return with_retries(fn.__name__, lambda: fn(store, *args, **kwargs), store.retries)

    return wrapper


def existing_sqlite_file(url: URL, field: str = "storage") -> Path | None:
    """The file behind a SQLite URL (a path or a ``file:`` URI), which must exist; None for
    other backends. For readers: opening a missing file would create an empty database and
    report no studies, so the path and the fix are named instead."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database or ""
    if db in ("", ":memory:"):
        raise ConfigError(field, "an in-memory SQLite database holds no study; give the "
                          "study's file, e.g. sqlite:///qsearch.db")
    if db.startswith("file:"):
        db = unquote(db[5:].split("?", 1)[0])
    path = Path(db).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(field, f"no SQLite database at {path}; launch a study first or "
                          "pass the right --storage URL")
    return path


class Store:
    """Access to qsearch's tables at one SQLAlchemy URL (SQLite file or PostgreSQL).

    Every public method is one transaction and is retried as a whole on transient errors
    (:func:`is_transient`). An error before the commit rolls everything back, so the retry
    starts clean; after an ambiguous commit (the connection died during COMMIT) the repeat is
    harmless for the idempotent writes (trial rows, epochs, lease compare-and-swap) and at
    worst adds one retry count or one duplicate Pareto snapshot."""

    def __init__(self, url: str, *, create: bool = True, retries: int | None = None):
        """``retries``: how often a transient error is retried (default ``QSEARCH_DB_RETRIES``);
        one-shot commands pass a small number so a wrong URL fails fast."""
        self.url = url
        self.retries = DB_RETRIES if retries is None else retries
        self.masked_url = mask_url(url)
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise ConfigError("storage", f"not a database URL: {url!r} ({e})") from None
        if not create:
            existing_sqlite_file(parsed)
        parsed = prefer_psycopg3(parsed)
        kwargs = engine_kwargs(parsed.get_backend_name())
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, ImportError) as e:
            raise StorageError(f"cannot use database {self.masked_url}: {e}") from e
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sqlalchemy_url = parsed.render_as_string(hide_password=False)
        if create:
            self.ensure_schema()

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def tx(self, what: str) -> Iterator[Connection]:
        """One transaction; backend errors become StorageError naming the (masked) URL."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (StorageError, ConfigError):
            raise
        except OperationalError as e:
            raise StorageError(f"{what}: database {self.masked_url} is unreachable or "
                               f"refused the operation: {_first_line(e)}") from e
        except SQLAlchemyError as e:
            raise StorageError(f"{what} failed on {self.masked_url}: {_first_line(e)}") from e

    def dispose(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[None]:
        """Hold the schema advisory lock (PostgreSQL; a no-op elsewhere) across transactions,
        e.g. while Optuna creates its tables."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY})
                    conn.commit()
                except DBAPIError as e:  # the session died, and its lock with it
                    log.debug("schema lock connection lost before unlock: %s", e)
                    conn.invalidate()

    @retried
    def ensure_schema(self) -> None:
        """Create (or upgrade) the qsearch tables exactly once, also when several drivers
        start together on an empty database: on PostgreSQL a transaction-scoped advisory lock
        serialises them, so the others find the tables made; on SQLite a lost race (a table
        created between check and create) is caught and re-checked."""
        for attempt in range(3):
            try:
                with self.tx("create qsearch schema") as conn:
                    self._lock_schema(conn)
                    s.metadata.create_all(conn, checkfirst=True)
                    row = conn.execute(select(s.schema_version.c.version)).first()
                    if row is None:
                        conn.execute(s.schema_version.insert().values(
                            id=1, version=s.SCHEMA_VERSION, applied_at=utcnow()))
                    elif row.version > s.SCHEMA_VERSION:
                        raise StorageError(
                            f"database {self.masked_url} has qsearch schema v{row.version}, "
                            f"newer than this qsearch (v{s.SCHEMA_VERSION}); upgrade qsearch")
                    elif row.version < s.SCHEMA_VERSION:
                        self._upgrade(conn, row.version)
                return
            except StorageError as e:
                cause = e.__cause__
                race = isinstance(cause, IntegrityError) or "already exists" in str(cause)
                if race and attempt < 2:
                    continue  # another driver created it between our check and create
                raise

    @staticmethod
    def _lock_schema(conn: Connection) -> None:
        """Serialise schema creation: PostgreSQL's advisory lock; on SQLite the write lock,
        taken up front (pysqlite would otherwise run each CREATE TABLE in a transaction of
        its own, and drivers starting together would interleave them)."""
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _upgrade(self, conn: Connection, version: int) -> None:
        """Bring an older qsearch schema up to date, in this (locked) transaction."""
        insp = inspect(conn)
        for v in range(version + 1, s.SCHEMA_VERSION + 1):
            for table, name in s.MIGRATIONS.get(v, []):
                if name in {c["name"] for c in insp.get_columns(table.name)}:
                    continue
                col = table.c[name]
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} " \
                      f"{col.type.compile(conn.dialect)}"
                if col.server_default is not None:
                    ddl += f" NOT NULL DEFAULT {col.server_default.arg}"
                conn.exec_driver_sql(ddl)
        conn.execute(update(s.schema_version).values(version=s.SCHEMA_VERSION,
                                                      applied_at=utcnow()))
        log.warning("upgraded the qsearch schema in %s from v%d to v%d", self.masked_url,
                    version, s.SCHEMA_VERSION)

    @retried
    def has_schema(self) -> bool:
        """Whether the qsearch tables are all there: the version row, written last in the
        creating transaction, is the test (a version table without its row is a schema
        some writer did not finish, e.g. a qsearch before schema creation was one
        SQLite transaction)."""
        with self.tx("inspect schema") as conn:
            if not inspect(conn).has_table(s.schema_version.name):
                return False
            return conn.execute(select(s.schema_version.c.version)).first() is not None

    # ------------------------------------------------------------------ studies
    @retried
    def get_study(self, name: str) -> StudyRecord | None:
        with self.tx("read study") as conn:
            row = conn.execute(select(s.studies).where(s.studies.c.name == name)).first()
        return _study(row) if row is not None else None

    @retried
    def create_or_get_study(self, name: str, *, spec_yaml: str, spec_hash: str,
                            search_hash: str, objectives: list[str], directions: list[str],
                            artifacts_dir: str) -> tuple[StudyRecord, bool]:
        """The study row, created if missing; ``(record, created)``. Two drivers creating the
        same study at once: the unique name makes one insert fail, and it reads the row."""
        existing = self.get_study(name)
        if existing is not None:
            return existing, False
        now = utcnow()
        try:
            with self.tx("create study") as conn:
                conn.execute(s.studies.insert().values(
                    name=name, spec_yaml=spec_yaml, spec_hash=spec_hash, search_hash=search_hash,
                    objectives=list(objectives), directions=list(directions), status="created",
                    artifacts_dir=artifacts_dir, created_at=now, updated_at=now))
        except StorageError as e:
            if not isinstance(e.__cause__, IntegrityError):
                raise
        rec = self.get_study(name)
        if rec is None:  # pragma: no cover - deleted between insert and read
            raise StorageError(f"study {name!r} vanished from {self.masked_url}")
        return rec, rec.created_at == now

    @retried
    def update_spec(self, study_id: int, spec_yaml: str, spec_hash: str) -> None:
        with self.tx("update study spec") as conn:
            conn.execute(update(s.studies).where(s.studies.c.id == study_id).values(
                spec_yaml=spec_yaml, spec_hash=spec_hash, updated_at=utcnow()))

    @retried
    def set_status(self, study_id: int, status: str, finished: bool = False) -> None:
        now = utcnow()
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if finished:
            values["finished_at"] = now
        with self.tx("set study status") as conn:
            conn.execute(update(s.studies).where(s.studies.c.id == study_id).values(**values))

    # ------------------------------------------------------------------ driver lease
    @retried
    def acquire_lease(self, study_id: int, *, host: str | None = None, pid: int | None = None,
                      stale_after_s: float | None = None) -> str:
        """Make this process the study's only driver; returns the lease token.

        A lease is free when nobody holds it, when its heartbeat is older than
        ``stale_after_s``, or when its holder is a dead process on this same host. Otherwise
        :class:`LeaseError` says who holds it. The take-over is a compare-and-swap on the old
        token, so two drivers racing for a free lease cannot both win.
        """
        host = host or socket.gethostname()
        pid = pid if pid is not None else os.getpid()
        stale = LEASE_STALE_S if stale_after_s is None else stale_after_s
        now = utcnow()
        token = uuid.uuid4().hex
        with self.tx("acquire driver lease") as conn:
            row = conn.execute(select(s.studies).where(s.studies.c.id == study_id)).one()
            old = row.lease_token
            if old is not None:
                age = (now - row.lease_heartbeat_at).total_seconds() if row.lease_heartbeat_at \
                    else float("inf")
                dead_here = row.lease_host == socket.gethostname() and row.lease_pid is not None \
                    and not _pid_alive(int(row.lease_pid))
                # Our own lease: a retried acquisition whose first commit did go through.
                mine = row.lease_host == host and row.lease_pid == pid
                if age < stale and not dead_here and not mine:
                    raise LeaseError(
                        f"study {row.name!r} is already being run by another driver (host "
                        f"{row.lease_host}, pid {row.lease_pid}, heartbeat {age:.0f} s ago); "
                        f"wait for it to finish, or relaunch once its heartbeat is older than "
                        f"{stale:.0f} s if it died")
                if not mine:
                    log.warning("taking over study %s from driver host %s pid %s (heartbeat "
                                "%.0f s ago)", row.name, row.lease_host, row.lease_pid, age)
            cond = s.studies.c.lease_token.is_(None) if old is None else \
                s.studies.c.lease_token == old
            res = conn.execute(update(s.studies).where(s.studies.c.id == study_id, cond).values(
                lease_host=host, lease_pid=pid, lease_token=token, lease_heartbeat_at=now,
                status="running", updated_at=now, finished_at=None))
            if res.rowcount != 1:
                raise LeaseError(f"study {row.name!r}: another driver took the lease at the "
                                 "same moment; try again")
        return token

    @retried
    def heartbeat(self, study_id: int, token: str) -> bool:
        """Refresh the lease; False if this driver no longer holds it."""
        with self.tx("refresh driver lease") as conn:
            res = conn.execute(update(s.studies).where(
                s.studies.c.id == study_id, s.studies.c.lease_token == token).values(
                lease_heartbeat_at=utcnow()))
        return res.rowcount == 1

    @retried
    def release_lease(self, study_id: int, token: str, status: str) -> None:
        now = utcnow()
        with self.tx("release driver lease") as conn:
            conn.execute(update(s.studies).where(
                s.studies.c.id == study_id, s.studies.c.lease_token == token).values(
                lease_host=None, lease_pid=None, lease_token=None, lease_heartbeat_at=None,
                status=status, updated_at=now,
                finished_at=now if status == "finished" else None))

    # ------------------------------------------------------------------ trials
    @retried
    def trial_started(self, study_id: int, number: int, *, optuna_trial_id: int | None,
                      params: dict[str, Any], config: dict[str, Any], max_epochs: int) -> None:
        """A trial (re)started. A restart after a failure keeps its epochs and retry count."""
        where = (s.trials.c.study_id == study_id, s.trials.c.number == number)
        values = {"optuna_trial_id": optuna_trial_id, "state": "RUNNING",
                  "params": _jsonable(params), "config": config, "max_epochs": max_epochs}
        with self.tx("record trial start") as conn:
            res = conn.execute(update(s.trials).where(*where).values(**values))
            if res.rowcount == 0:
                conn.execute(s.trials.insert().values(
                    study_id=study_id, number=number, counted=False, epochs_completed=0,
                    retries=0, started_at=utcnow(), **values))

    @retried
    def trial_retried(self, study_id: int, number: int) -> int:
        """Count one restart of a trial whose process or node died; returns the new count."""
        where = (s.trials.c.study_id == study_id, s.trials.c.number == number)
        with self.tx("record trial retry") as conn:
            conn.execute(update(s.trials).where(*where).values(retries=s.trials.c.retries + 1))
            return int(conn.execute(select(s.trials.c.retries).where(*where)).scalar() or 0)

    @retried
    def set_placement(self, study_id: int, number: int, placement: dict[str, Any]) -> None:
        """Where the trial's current attempt runs (node, pid, GPU ids, device)."""
        with self.tx("record trial placement") as conn:
            conn.execute(update(s.trials).where(
                s.trials.c.study_id == study_id, s.trials.c.number == number).values(
                placement=placement))

    @retried
    def record_epoch(self, study_id: int, number: int, metrics: dict[str, Any]) -> None:
        """Store one epoch's report (idempotent: a repeated epoch replaces the row)."""
        epoch = int(metrics["epoch"])
        cols = {k: _finite(metrics.get(k)) for k in _OPTIONAL_METRIC_COLUMNS}
        with self.tx("record epoch metrics") as conn:
            conn.execute(delete(s.epoch_metrics).where(
                s.epoch_metrics.c.study_id == study_id, s.epoch_metrics.c.trial_number == number,
                s.epoch_metrics.c.epoch == epoch))
            conn.execute(s.epoch_metrics.insert().values(
                study_id=study_id, trial_number=number, epoch=epoch, metrics=_jsonable(metrics),
                created_at=utcnow(), **cols))
            conn.execute(update(s.trials).where(
                s.trials.c.study_id == study_id, s.trials.c.number == number,
                s.trials.c.state == "RUNNING").values(epochs_completed=epoch))

    @retried
    def trial_finished(self, study_id: int, number: int, *, state: str, detail: str,
                       counted: bool, values: dict[str, Any] | None = None,
                       epochs_completed: int | None = None, error: str | None = None,
                       layers: list[dict[str, Any]] | None = None,
                       weights_path: str | None = None) -> None:
        """Final state of a trial, its objective values and its per-layer records."""
        vals = {k: _finite((values or {}).get(k)) for k in ("accuracy", "size_mb",
                                                             "backward_cost", "bops")}
        upd: dict[str, Any] = {"state": state, "detail": detail, "counted": counted,
                               "error": error, "weights_path": weights_path,
                               "finished_at": utcnow()}
        if values is not None:
            upd.update(vals)
        if epochs_completed is not None:
            upd["epochs_completed"] = epochs_completed
        with self.tx("record trial end") as conn:
            res = conn.execute(update(s.trials).where(
                s.trials.c.study_id == study_id, s.trials.c.number == number).values(**upd))
            if res.rowcount == 0:
                conn.execute(s.trials.insert().values(
                    study_id=study_id, number=number, started_at=utcnow(),
                    epochs_completed=upd.pop("epochs_completed", 0) or 0, **upd))
            if layers:
                conn.execute(delete(s.layers).where(s.layers.c.study_id == study_id,
                                                    s.layers.c.trial_number == number))
                conn.execute(s.layers.insert(), [
                    {"study_id": study_id, "trial_number": number, "idx": i,
                     "name": r["name"], "kind": r.get("kind"), "params": int(r["params"]),
                     "macs": int(r["macs"]), "w_bits": int(r["w_bits"]),
                     "a_bits": int(r["a_bits"]), "g_bits": int(r.get("g_bits", 32)),
                     "frozen_fraction": float(r.get("frozen_fraction", 0.0))}
                    for i, r in enumerate(layers)])

    @retried
    def clear_weights_path(self, study_id: int, numbers: list[int]) -> None:
        if not numbers:
            return
        with self.tx("forget pruned weights") as conn:
            conn.execute(update(s.trials).where(
                s.trials.c.study_id == study_id, s.trials.c.number.in_(numbers)).values(
                weights_path=None))

    # ------------------------------------------------------------------ pareto
    @retried
    def write_snapshot(self, study_id: int, *, trigger_trial: int | None, n_complete: int,
                       points: list[dict[str, Any]], hypervolume: float | None,
                       reference_point: dict[str, float] | None) -> int:
        """Append a Pareto snapshot (its number is returned). ``points``: dicts with
        ``trial_number``, objective values and ``is_knee``."""
        with self.tx("write pareto snapshot") as conn:
            last = conn.execute(select(s.pareto_snapshots.c.snapshot).where(
                s.pareto_snapshots.c.study_id == study_id).order_by(
                s.pareto_snapshots.c.snapshot.desc()).limit(1)).scalar()
            snap = (last or 0) + 1
            conn.execute(s.pareto_snapshots.insert().values(
                study_id=study_id, snapshot=snap, trigger_trial=trigger_trial,
                n_complete=n_complete, hypervolume=_finite(hypervolume),
                reference_point=reference_point, created_at=utcnow()))
            if points:
                conn.execute(s.pareto_points.insert(), [
                    {"study_id": study_id, "snapshot": snap,
                     "trial_number": int(p["trial_number"]),
                     "accuracy": _finite(p.get("accuracy")), "size_mb": _finite(p.get("size_mb")),
                     "backward_cost": _finite(p.get("backward_cost")),
                     "is_knee": bool(p.get("is_knee", False))} for p in points])
        return snap


def _first_line(e: Exception) -> str:
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
    finally:
        cur.close()


def _study(row: Any) -> StudyRecord:
    m = row._mapping
    return StudyRecord(
        id=m["id"], name=m["name"], status=m["status"], spec_yaml=m["spec_yaml"],
        spec_hash=m["spec_hash"], search_hash=m["search_hash"], objectives=list(m["objectives"]),
        directions=list(m["directions"]), artifacts_dir=m["artifacts_dir"],
        created_at=m["created_at"], finished_at=m["finished_at"], lease_host=m["lease_host"],
        lease_pid=m["lease_pid"], lease_heartbeat_at=m["lease_heartbeat_at"])
