"""Creating the qsearch tables and upgrading older schemas in place.

One database may be opened by several drivers at once (and by readers while a driver creates
it), so creation and upgrades run in one transaction under a lock: PostgreSQL's advisory
lock, SQLite's write lock taken up front. The version row is written last, so
:func:`has_schema` never reports a half-made schema.

Upgrades, from version v-1 to v:

* v2: ``qsearch_trials.retries`` and ``.placement`` (columns added).
* v3: values by name: ``qsearch_trial_values`` and ``qsearch_pareto_values`` (new tables,
  made by ``create_all``), filled from the old value columns, which stay in place so an
  older qsearch still reads the store.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from sqlalchemy import Connection, inspect, literal, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from qsearch.errors import StorageError
from qsearch.store import schema as s
from qsearch.store.engine import Database, retried, utcnow

log = logging.getLogger(__name__)
#: Any constant: the PostgreSQL advisory lock that serialises schema creation and upgrades.
SCHEMA_LOCK_KEY = 0x71736561  # "qsea"

#: Columns added to existing tables, per version (table, column).
ADDED_COLUMNS: dict[int, list[tuple[s.Table, str]]] = {
    2: [(s.trials, "retries"), (s.trials, "placement")],
    3: [(s.trials, "feasible"), (s.trials, "reused_from")],
}


def _copy_values_to_named_rows(conn: Connection) -> None:
    """v3: every non-NULL old value column becomes a row named after the column. The names
    stay what they were (``accuracy`` measured on the test split, ``backward_cost``, the old
    name of ``backward_bops``); the objective registry knows both."""
    for name in s.LEGACY_TRIAL_VALUES:
        col = s.trials.c[name]
        conn.execute(s.trial_values.insert().from_select(
            ["study_id", "trial_number", "name", "value"],
            select(s.trials.c.study_id, s.trials.c.number, literal(name), col).where(
                col.is_not(None))))
    for name in s.LEGACY_POINT_VALUES:
        col = s.pareto_points.c[name]
        p = s.pareto_points.c
        conn.execute(s.pareto_values.insert().from_select(
            ["study_id", "snapshot", "trial_number", "name", "value"],
            select(p.study_id, p.snapshot, p.trial_number, literal(name), col).where(
                col.is_not(None))))


#: Data copied after the tables and columns of a version exist (in the same transaction).
DATA_MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    3: _copy_values_to_named_rows,
}


@retried
def ensure_schema(db: Database) -> None:
    """Create (or upgrade) the qsearch tables exactly once, also when several drivers
    start together on an empty database: on PostgreSQL a transaction-scoped advisory lock
    serialises them, so the others find the tables made; on SQLite a lost race (a table
    created between check and create) is caught and re-checked."""
    for attempt in range(3):
        try:
            with db.tx("create qsearch schema") as conn:
                lock_schema(conn)
                s.metadata.create_all(conn, checkfirst=True)
                row = conn.execute(select(s.schema_version.c.version)).first()
                if row is None:
                    conn.execute(s.schema_version.insert().values(
                        id=1, version=s.SCHEMA_VERSION, applied_at=utcnow()))
                elif row.version > s.SCHEMA_VERSION:
                    raise StorageError(
                        f"database {db.masked_url} has qsearch schema v{row.version}, "
                        f"newer than this qsearch (v{s.SCHEMA_VERSION}); upgrade qsearch")
                elif row.version < s.SCHEMA_VERSION:
                    upgrade(conn, row.version, db.masked_url)
            return
        except StorageError as e:
            cause = e.__cause__
            race = isinstance(cause, IntegrityError) or "already exists" in str(cause)
            if race and attempt < 2:
                continue  # another driver created it between our check and create
            raise


def lock_schema(conn: Connection) -> None:
    """Serialise schema creation: PostgreSQL's advisory lock; on SQLite the write lock,
    taken up front (pysqlite would otherwise run each CREATE TABLE in a transaction of
    its own, and drivers starting together would interleave them)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def upgrade(conn: Connection, version: int, where: str = "") -> None:
    """Bring an older qsearch schema up to date, in this (locked) transaction; new tables
    already exist (``create_all`` ran first)."""
    insp = inspect(conn)
    for v in range(version + 1, s.SCHEMA_VERSION + 1):
        for table, name in ADDED_COLUMNS.get(v, []):
            if name in {c["name"] for c in insp.get_columns(table.name)}:
                continue
            col = table.c[name]
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} " \
                  f"{col.type.compile(conn.dialect)}"
            if col.server_default is not None:
                ddl += f" NOT NULL DEFAULT {col.server_default.arg}"
            conn.exec_driver_sql(ddl)
        if v in DATA_MIGRATIONS:
            DATA_MIGRATIONS[v](conn)
    conn.execute(update(s.schema_version).values(version=s.SCHEMA_VERSION, applied_at=utcnow()))
    log.warning("upgraded the qsearch schema in %s from v%d to v%d", where or "the database",
                version, s.SCHEMA_VERSION)


@retried
def has_schema(db: Database) -> bool:
    """Whether the qsearch tables are all there: the version row, written last in the
    creating transaction, is the test (a version table without its row is a schema
    some writer did not finish, e.g. a qsearch before schema creation was one
    SQLite transaction)."""
    with db.tx("inspect schema") as conn:
        if not inspect(conn).has_table(s.schema_version.name):
            return False
        return conn.execute(select(s.schema_version.c.version)).first() is not None


@retried
def schema_version(db: Database) -> int | None:
    """The version row's number (None before any schema)."""
    with db.tx("read schema version") as conn:
        if not inspect(conn).has_table(s.schema_version.name):
            return None
        return conn.execute(select(s.schema_version.c.version)).scalar()


@contextlib.contextmanager
def schema_lock(db: Database) -> Iterator[None]:
    """Hold the schema advisory lock (PostgreSQL; a no-op elsewhere) across transactions,
    e.g. while Optuna creates its tables."""
    if db.engine.dialect.name != "postgresql":
        yield
        return
    with db.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
                conn.commit()
            except DBAPIError as e:  # the session died, and its lock with it
                log.debug("schema lock connection lost before unlock: %s", e)
                conn.invalidate()
