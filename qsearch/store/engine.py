"""Connecting to the database: URLs, engine settings, transactions, and the retry policy.

:class:`Database` is one SQLAlchemy engine on one URL with :meth:`Database.tx` (one
transaction; backend errors become :class:`~qsearch.errors.StorageError` naming the URL with
its password masked). Readers (CLI, dashboards) use a :class:`Database` directly; the writing
driver uses :class:`~qsearch.store.Store`, which is a Database plus the writes.

Settings from the environment (retries, back-off, pool sizes) are read through
:mod:`qsearch.config.defaults` each time they are needed, never at import.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    SQLAlchemyError,
)

from qsearch.config import defaults
from qsearch.config.urls import explain_database_error
from qsearch.errors import ConfigError, StorageError

log = logging.getLogger(__name__)
#: The longest single back-off between two attempts (seconds).
DB_RETRY_MAX_S = 5.0


def utcnow() -> datetime:
    """Naive UTC now: every qsearch timestamp is stored this way."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable URL>"


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
        kwargs.update(pool_size=defaults.db_pool_size(), max_overflow=defaults.db_max_overflow(),
                      pool_timeout=30, pool_recycle=1800)
    return kwargs


def sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
    """The writer's SQLite settings: foreign keys on, wait a minute for a held lock, and in
    WAL mode (a running study, :mod:`qsearch.store.journal`) commits that skip the disk sync."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
    finally:
        cur.close()
    synchronous_normal_in_wal(dbapi_conn, record)


def synchronous_normal_in_wal(dbapi_conn: Any, _record: Any) -> None:
    """Connect hook: in WAL mode, commit without waiting for the disk (``synchronous=NORMAL``
    keeps the file consistent; only the last commits before a power cut can be lost)."""
    cur = dbapi_conn.cursor()
    try:
        if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


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


# ----------------------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """A database error that a retry on a fresh connection can fix (also when wrapped, as
    in StorageError or Optuna's StorageInternalError). Errors qsearch raises itself (a held
    lease, an unknown study) have no SQLAlchemy cause and are never transient."""
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
        # Connection lost/refused, server shutting down, failover: worth a retry. A database
        # or user that does not exist, a refused password: a retry only delays the one-line
        # fix (explain_database_error) the caller should see.
        return explain_database_error(cause, "") is None
    return isinstance(cause, InterfaceError)


_retrying = threading.local()


def in_retried_call() -> bool:
    """Whether this thread is inside a :func:`with_retries` unit (whose outermost call, not
    this one, decides about retries and turns the last error into a report)."""
    return bool(getattr(_retrying, "active", False))


def with_retries(what: str, fn: Callable[[], Any], attempts: int | None = None) -> Any:
    """Call ``fn`` (one whole unit of work), retrying transient errors with jittered
    exponential back-off; the last error propagates. ``attempts`` defaults to
    ``QSEARCH_DB_RETRIES`` (read now).

    Only the outermost call in a thread retries: a retried unit made of retried parts
    (a query that reads the study, then its trials) repeats as a whole, and the attempts do
    not multiply."""
    if in_retried_call():
        return fn()
    n = defaults.db_retries() if attempts is None else attempts
    base = defaults.db_retry_base_s()
    _retrying.active = True
    try:
        for attempt in range(n + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - is_transient decides; the rest propagates
                if attempt == n or not is_transient(e):
                    raise
                delay = random.uniform(0, min(DB_RETRY_MAX_S, base * 2 ** attempt))
                log.warning("%s: transient database error (%s); retry %d/%d in %.2f s", what,
                            str(e).splitlines()[0][:200], attempt + 1, n, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        _retrying.active = False


def retried(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a function whose first argument is a :class:`Database` (a Store method,
    a query, a write): the whole call is retried on transient errors, ``db.retries`` times."""

    @functools.wraps(fn)
    def wrapper(db: Database, *args: Any, **kwargs: Any) -> Any:
        return with_retries(fn.__name__, lambda: fn(db, *args, **kwargs), db.retries)

    return wrapper


def first_line(e: Exception) -> str:
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- database


class Database:
    """One engine on one SQLAlchemy URL (SQLite file or PostgreSQL); never writes by itself.

    ``retries``: how often a transient error is retried; None (the default) means
    ``QSEARCH_DB_RETRIES`` at the time of each call. One-shot commands pass a small number so
    a wrong URL fails fast. ``must_exist``: a SQLite file that is not there is a ConfigError
    (readers), not a new empty database. ``engine_options`` / ``on_connect`` replace the
    writer's engine settings (a read-only dashboard connection)."""

    def __init__(self, url: str, *, retries: int | None = None, must_exist: bool = False,
                 engine_options: dict[str, Any] | None = None,
                 on_connect: Callable[[Any, Any], None] | None = None):
        self.url = url
        self.retries = retries
        self.masked_url = mask_url(url)
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise ConfigError("storage", f"not a database URL: {url!r} ({e})") from None
        if must_exist:
            existing_sqlite_file(parsed)
        parsed = prefer_psycopg3(parsed)
        backend = parsed.get_backend_name()
        kwargs = engine_kwargs(backend) if engine_options is None else dict(engine_options)
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, ImportError) as e:
            raise StorageError(f"cannot use database {self.masked_url}: {e}") from e
        hook = on_connect if on_connect is not None else \
            sqlite_pragmas if backend == "sqlite" else None
        if hook is not None:
            event.listen(self.engine, "connect", hook)
        self.sqlalchemy_url = parsed.render_as_string(hide_password=False)

    @contextlib.contextmanager
    def tx(self, what: str) -> Iterator[Connection]:
        """One transaction; backend errors become StorageError naming the (masked) URL."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (StorageError, ConfigError):
            raise
        except OperationalError as e:
            fix = explain_database_error(e, self.url)
            if fix is not None:
                raise StorageError(f"{what}: {fix}") from e
            raise StorageError(f"{what}: database {self.masked_url} is unreachable or "
                               f"refused the operation: {first_line(e)}") from e
        except SQLAlchemyError as e:
            raise StorageError(f"{what} failed on {self.masked_url}: {first_line(e)}") from e

    def dispose(self) -> None:
        self.engine.dispose()

    # Reads every caller needs; defined in their modules, bound here.
    def has_schema(self) -> bool:
        from qsearch.store.migrations import has_schema

        return has_schema(self)

    def get_study(self, name: str) -> Any:
        from qsearch.store.queries import get_study

        return get_study(self, name)
