"""Read-only access to a study database: the dashboard and the report never write.

Why this matters: the study driver and Optuna write to the same database while the dashboard
polls it. On SQLite a reader that starts a write (or holds a lock for long) can make the
driver's commit wait or, past its timeout, fail with "database is locked". So:

* SQLite files are opened through a URI with ``mode=ro`` — SQLite itself refuses any write,
  and a read-only connection never takes the RESERVED lock a writer needs.
* PostgreSQL sessions start with ``default_transaction_read_only=on``.
* Every query is its own short transaction (:mod:`qsearch.store.queries`, the only place
  with SQL), rows are fetched at once, nothing is held between requests.
* The handle is a :class:`~qsearch.store.Database`, not a :class:`~qsearch.store.Store`: it
  has no write methods and never creates or upgrades the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from qsearch.errors import ConfigError, StorageError
from qsearch.config import defaults
from qsearch.store import Database, existing_sqlite_file, mask_url

#: How long one dashboard read waits for a writer's lock before giving up (seconds). Short on
#: purpose: a page that cannot read now simply shows the last data on its next refresh.
READ_TIMEOUT_S = 10.0


def default_storage() -> str:
    """Same default as the rest of the CLI: ``$QSEARCH_STORAGE`` or ``sqlite:///qsearch.db``."""
    return defaults.storage_url()


def readonly_url(url: str, field_name: str = "--storage") -> tuple[str, dict[str, Any]]:
    """(read-only SQLAlchemy URL, ``connect_args``) for a user's storage URL."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError as e:
        raise ConfigError(field_name, f"not a database URL: {url!r} ({e})") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = existing_sqlite_file(parsed, field_name)
        ro = f"sqlite:///file:{quote(str(path), safe='/')}?mode=ro&uri=true"
        return ro, {"timeout": READ_TIMEOUT_S}
    if backend == "postgresql":
        return parsed.render_as_string(hide_password=False), {
            "options": "-c default_transaction_read_only=on"}
    # Other backends (MySQL ...) have no per-connection read-only switch we can rely on;
    # the dashboard still only runs SELECTs.
    return parsed.render_as_string(hide_password=False), {}


@dataclass
class Source:
    """One database opened read-only: qsearch's tables through a :class:`Database` (never
    creating them) and Optuna's through a read-only ``RDBStorage``, both on the same URL."""

    url: str
    ro_url: str
    connect_args: dict[str, Any]
    store: Database
    _optuna: Any = field(default=None, repr=False)

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def optuna_storage(self) -> Any:
        """A read-only ``optuna.storages.RDBStorage`` (no table creation, no version check
        that could write)."""
        if self._optuna is None:
            import optuna

            try:
                self._optuna = optuna.storages.RDBStorage(
                    self.ro_url, engine_kwargs={"connect_args": dict(self.connect_args),
                                                "pool_pre_ping": True},
                    skip_table_creation=True, skip_compatibility_check=True)
            except Exception as e:
                raise StorageError(f"cannot read Optuna's tables at {self.masked_url}: "
                                   f"{str(e).splitlines()[0]}") from e
        return self._optuna

    def close(self) -> None:
        self.store.dispose()
        if self._optuna is not None:
            self._optuna.engine.dispose()


def open_source(url: str | None = None) -> Source:
    """Open ``url`` (default :func:`default_storage`) read-only."""
    url = url or default_storage()
    ro, connect_args = readonly_url(url)
    # Not the writer's engine settings (60 s SQLite timeout): a reader gives up sooner and
    # also refuses writes at the connection level.
    sqlite = ro.startswith("sqlite")
    store = Database(ro, engine_options={"connect_args": connect_args, "pool_pre_ping": True},
                     on_connect=_sqlite_reader_pragmas if sqlite else None)
    return Source(url=url, ro_url=store.sqlalchemy_url, connect_args=connect_args, store=store)


def _sqlite_reader_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={int(READ_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA query_only=ON")  # belt and braces: no write statement runs
    finally:
        cur.close()
