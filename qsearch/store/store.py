"""The writer's handle on the store: a :class:`~qsearch.store.engine.Database` whose tables
are created (or upgraded) on open, with the lease and the writes as methods.

Only the study driver writes; Ray workers report through Ray Tune. Each method is one
transaction, retried as a whole on transient errors; any SQLAlchemy error becomes a
:class:`~qsearch.errors.StorageError` naming the URL with the password masked. The code lives
by concern: :mod:`.engine` (URLs, engines, retries), :mod:`.schema` and :mod:`.migrations`
(tables, creation, upgrades), :mod:`.lease`, :mod:`.writes`, and :mod:`.queries` (reads,
which take any Database).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from qsearch.config import defaults
from qsearch.store import lease, migrations, queries, writes
from qsearch.store.engine import Database
from qsearch.store.lease import LeaseError
from qsearch.store.queries import StudyRecord

__all__ = ["LeaseError", "Store", "StudyRecord"]


class Store(Database):
    """qsearch's tables at one SQLAlchemy URL, for the process that writes them.

    ``create``: make or upgrade the tables now (the driver); False opens an existing
    database as it is (a missing SQLite file is then an error, not a new empty file)."""

    def __init__(self, url: str, *, create: bool = True, retries: int | None = None):
        super().__init__(url, retries=retries, must_exist=not create)
        if create:
            self.ensure_schema()

    # schema
    ensure_schema = migrations.ensure_schema
    has_schema = migrations.has_schema

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[None]:
        """Hold the schema lock across transactions (Optuna's table creation)."""
        with migrations.schema_lock(self):
            yield

    # studies
    get_study = queries.get_study
    create_or_get_study = writes.create_or_get_study
    update_spec = writes.update_spec
    set_status = writes.set_status

    # driver lease
    acquire_lease = lease.acquire_lease
    heartbeat = lease.heartbeat
    release_lease = lease.release_lease

    # trials
    trial_started = writes.trial_started
    trial_retried = writes.trial_retried
    set_placement = writes.set_placement
    record_epoch = writes.record_epoch
    trial_finished = writes.trial_finished
    clear_weights_path = writes.clear_weights_path
    import_trials = writes.import_trials

    # pareto
    write_snapshot = writes.write_snapshot


def __getattr__(name: str) -> Any:
    # Compatibility for callers of the import-time constants: read the environment now.
    if name == "DB_RETRIES":
        return defaults.db_retries()
    if name == "LEASE_STALE_S":
        return defaults.lease_timeout_s()
    raise AttributeError(name)
