"""The SQL store: qsearch's tables beside Optuna's in one database (see :mod:`.schema`).

:class:`Store` does every write (only the study driver calls those); :mod:`.queries` holds
the read-only functions the CLI, export and dashboards use.
"""

from qsearch.store import queries
from qsearch.store.optuna_storage import RetryingRDBStorage, optuna_storage
from qsearch.store.schema import SCHEMA_VERSION
from qsearch.store.store import (
    LeaseError,
    Store,
    StudyRecord,
    existing_sqlite_file,
    is_transient,
    mask_url,
    utcnow,
    with_retries,
)

__all__ = ["SCHEMA_VERSION", "LeaseError", "RetryingRDBStorage", "Store", "StudyRecord",
           "existing_sqlite_file", "is_transient", "mask_url", "optuna_storage", "queries", "utcnow", "with_retries"]
