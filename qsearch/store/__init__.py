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
from qsearch.store.optuna_storage import RetryingStorage, optuna_storage
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
