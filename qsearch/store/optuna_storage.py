"""Optuna's RDB storage on the study's URL, made fit for a long-running driver.

The study is an ordinary Optuna study; qsearch only changes how the storage talks to the
database: the same engine settings as the qsearch tables (:func:`~.engine.engine_kwargs`:
``pool_pre_ping``, bounded pool), every storage call retried on transient errors (a dropped
connection raises ``StorageInternalError`` from Optuna mid-study otherwise) through a wrapper
that speaks only Optuna's public storage contract, and, on
PostgreSQL, Optuna's table creation under the advisory lock that serialises qsearch's own,
so drivers starting together on an empty database do not race.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy.exc import SQLAlchemyError

from qsearch.errors import StorageError
from qsearch.store.engine import engine_kwargs, first_line, in_retried_call, with_retries
from qsearch.store.journal import add_wal_hook
from qsearch.store.store import Store


def _retrying(name: str) -> Callable[..., Any]:
    # A storage call made inside a retried one runs once; the outer call repeats it and, when
    # the database is still down after every retry, reports it as a StorageError naming the
    # database (what the CLI prints as one line), not as Optuna's StorageInternalError.
    def call(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        outermost = not in_retried_call()
        try:
            return with_retries(f"optuna storage {name}", lambda: method(*args, **kwargs))
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            if not outermost:
                raise  # the enclosing retried unit classifies the original error
            cause = e.__cause__ if isinstance(e.__cause__, SQLAlchemyError) else e
            raise StorageError(
                f"the study database {self.where} is unreachable or refused the operation "
                f"(Optuna storage {name}: {first_line(cause)}); once it is back, launch the "
                "same spec again to resume") from e

    call.__name__ = name
    call.__doc__ = getattr(BaseStorage, name).__doc__
    return call


def _storage_api() -> dict[str, Any]:
    """One retried delegate per public method of Optuna's storage contract."""
    return {n: _retrying(n) for n, m in vars(BaseStorage).items()
            if not n.startswith("_") and callable(m)}


class _RetryingBase(BaseStorage):
    def __init__(self, inner: RDBStorage, where: str = ""):
        self.inner = inner
        self.where = where  # the masked URL, for error messages

    def dispose(self) -> None:
        """Close the pooled connections (the driver, done with the study)."""
        self.inner.engine.dispose()


#: An Optuna storage that wraps an ``RDBStorage`` (composition, not a subclass): every call of
#: the public ``BaseStorage`` contract is one database session, retried as a whole
#: (jittered back-off) on transient errors. Optuna talks to it only through that contract.
RetryingStorage = type("RetryingStorage", (_RetryingBase,), {
    "__doc__": _RetryingBase.__init__.__doc__, **_storage_api()})
RetryingStorage.__doc__ = ("Optuna storage delegating every public BaseStorage call to an "
                           "RDBStorage, retried on transient database errors.")


def optuna_storage(store: Store) -> BaseStorage:
    """The Optuna storage for ``store``'s database (creating Optuna's tables if needed)."""
    kwargs = engine_kwargs(store.engine.dialect.name)

    def open_storage() -> BaseStorage:
        with store.schema_lock():
            rdb = RDBStorage(store.sqlalchemy_url, engine_kwargs=dict(kwargs))
            if add_wal_hook(rdb.engine):
                rdb.engine.dispose()  # reconnect with the hook's settings
            return RetryingStorage(rdb, store.masked_url)

    try:
        return with_retries("open Optuna storage", open_storage, store.retries)
    except (SQLAlchemyError, RuntimeError, optuna.exceptions.StorageInternalError) as e:
        raise StorageError(f"Optuna storage at {store.masked_url} failed: "
                           f"{str(e).splitlines()[0]}") from e
