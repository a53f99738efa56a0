"""Dataset registry. Importing this package registers the built-in datasets."""

from qsearch.data import builtin  # noqa: F401
from qsearch.data.registry import (
    DatasetBundle,
    DatasetEntry,
    dataset_entry,
    iterate_batches,
    list_datasets,
    load_dataset,
    register_dataset,
)

__all__ = ["DatasetBundle", "DatasetEntry", "dataset_entry", "iterate_batches", "list_datasets",
           "load_dataset", "register_dataset"]
