"""Optuna's RDB storage on the study's URL, made fit for a long-running driver.

The study is an ordinary Optuna study; qsearch only changes how the storage talks to the
database: the same engine settings as the qsearch tables (:func:`~.engine.engine_kwargs`:
``pool_pre_ping``, bounded pool), every storage call retried on transient errors (a dropped
connection raises ``StorageInternalError`` from Optuna mid-study otherwise), and, on
PostgreSQL, Optuna's table creation under the advisory lock that serialises qsearch's own,
so drivers starting together on an empty database do not race.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy.exc import SQLAlchemyError

from qsearch.errors import StorageError
from qsearch.store.engine import engine_kwargs, with_retries
from qsearch.store.store import Store


class RetryingRDBStorage(RDBStorage):
    """``RDBStorage`` whose public calls are retried (jittered back-off) on transient errors.
    A call is one Optuna session (one transaction), so a retry repeats all of it."""


#: Private RDBStorage methods that Optuna's ``_CachedStorage`` (which wraps every RDB storage
#: a study uses) calls directly; they are database sessions too.
_CACHED_STORAGE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials",
                         "_get_best_trial_id", "_get_stale_trial_ids")


def _retrying(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    # A storage call made inside a retried one runs once; the outer call repeats it.
    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return with_retries(f"optuna storage {name}", lambda: method(self, *args, **kwargs))

    return call


for _name in [n for n, m in vars(BaseStorage).items() if not n.startswith("_") and callable(m)] \
        + list(_CACHED_STORAGE_CALLS):
    if callable(getattr(RDBStorage, _name, None)):
        setattr(RetryingRDBStorage, _name, _retrying(_name, getattr(RDBStorage, _name)))


def optuna_storage(store: Store) -> RetryingRDBStorage:
    """The Optuna storage for ``store``'s database (creating Optuna's tables if needed)."""
    kwargs = engine_kwargs(store.engine.dialect.name)

    def open_storage() -> RetryingRDBStorage:
        with store.schema_lock():
            return RetryingRDBStorage(store.sqlalchemy_url, engine_kwargs=dict(kwargs))

    try:
        return with_retries("open Optuna storage", open_storage, store.retries)
    except (SQLAlchemyError, RuntimeError, optuna.exceptions.StorageInternalError) as e:
        raise StorageError(f"Optuna storage at {store.masked_url} failed: "
                           f"{str(e).splitlines()[0]}") from e
