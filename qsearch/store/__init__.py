"""The SQL store: qsearch's tables beside Optuna's in one database (see :mod:`.schema`).

* :mod:`.engine` — :class:`Database` (URL, engine, ``tx``), transient-error retries;
* :mod:`.schema`, :mod:`.migrations` — tables, creation and in-place upgrades;
* :mod:`.lease` — one live driver per study;
* :mod:`.writes` — every write the driver makes (values by objective name);
* :mod:`.queries` — read-only queries returning typed records (CLI, export, dashboards);
* :class:`Store` — a Database that creates the schema and has the writes as methods.
"""

from qsearch.store import queries
from qsearch.store.engine import (
    Database,
    existing_sqlite_file,
    is_transient,
    mask_url,
    retried,
    utcnow,
    with_retries,
)
from qsearch.store.lease import LeaseError
from qsearch.store.queries import (
    EpochRow,
    FrontPoint,
    LayerRow,
    ObjectiveInfo,
    SnapshotRow,
    StudyRecord,
    StudyRow,
    TrialRow,
    TrialValues,
    objective_info,
)
from qsearch.store.schema import SCHEMA_VERSION
from qsearch.store.store import Store
from qsearch.store.writes import objective_values

__all__ = ["SCHEMA_VERSION", "Database", "EpochRow", "FrontPoint", "LayerRow", "LeaseError",
           "ObjectiveInfo", "RetryingStorage", "SnapshotRow", "Store", "StudyRecord",
           "StudyRow", "TrialRow", "TrialValues", "existing_sqlite_file", "is_transient",
           "mask_url", "objective_info", "objective_values", "optuna_storage", "queries",
           "retried", "utcnow", "with_retries"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: Optuna loads only for the driver
    """``optuna_storage`` and ``RetryingStorage`` import Optuna, which the read-only commands
    (``qsearch studies``, ``pareto``, the dashboards) never need."""
    if name in ("optuna_storage", "RetryingStorage"):
        import importlib

        module = importlib.import_module("qsearch.store.optuna_storage")
        # Importing the submodule bound its name on this package; the function wins.
        globals().update(optuna_storage=module.optuna_storage,
                         RetryingStorage=module.RetryingStorage)
        return globals()[name]
    raise AttributeError(f"module 'qsearch.store' has no attribute {name!r}")
