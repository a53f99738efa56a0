"""Dataset registry: ``@register_dataset`` on a loader ``(DataConfig) -> DatasetBundle``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from qsearch.config.catalog import DatasetInfo, declare_dataset
from qsearch.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


@dataclass
class DatasetBundle:
    """Train/validation/test splits plus what a model builder needs to know.

    ``train`` is what the trainer (and the FP32 warm start) learns from; ``val`` is what the
    search selects on (``None`` only with ``data.val_fraction: 0``); ``test`` is measured once,
    when a trial finishes.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    # In-memory tensor datasets can be batched without a DataLoader (much faster for tiny data).
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    val: Dataset | None = None
    #: Where ``val`` came from, in words (``qsearch datasets`` prints the same per dataset).
    val_source: str = ""
    #: Per split, the indices of its samples in one source pool (digits: the 1797 images;
    #: CIFAR: the training file, so only ``train`` and ``val``). A split drawn from a separate
    #: source (CIFAR's test file, an ImageFolder's ``val/``) is not listed.
    split_indices: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def split(self, name: str) -> Dataset:
        """The dataset of split ``name`` (train, val or test); DataError if it has none."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        ds = getattr(self, name)
        if ds is None:
            raise DataError("data.val_fraction: this run has no validation split "
                            "(data.val_fraction is 0); set it above 0 to hold one out")
        return ds

    def has_split(self, name: str) -> bool:
        return name in SPLITS and getattr(self, name) is not None


Loader = Callable[[Any], DatasetBundle]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Loader
    description: str
    #: Where the validation split comes from, in words (``qsearch datasets``).
    validation: str = ""


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, description: str,
                     validation: str = "data.val_fraction of the training split "
                                       "(stratified, data.split_seed)",
                     ) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, fn, description, validation)
        declare_dataset(DatasetInfo(name, description))
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_entry(name: str) -> DatasetEntry:
    if name not in _DATASETS:
        raise ConfigError(
            "dataset", f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}"
        )
    return _DATASETS[name]


#: In-memory bundles already loaded by this process, by (dataset, options). Ray Tune reuses
#: a worker process for the next trial (``reuse_actors``), so a study's trials after the
#: first on each worker skip the loading and preprocessing. Bundles are never mutated.
_LOADED: dict[tuple[str, str], DatasetBundle] = {}
_MAX_CACHED = 4


def _options_key(options: Any) -> str:
    dump = getattr(options, "model_dump_json", None)
    return dump() if callable(dump) else repr(options)


def load_dataset(name: str, options: Any) -> DatasetBundle:
    """The dataset ``name`` with ``options`` (a DataConfig); in-memory tensor datasets are
    kept per process, so a reused worker does not load them again."""
    key = (name, _options_key(options))
    hit = _LOADED.get(key)
    if hit is not None:
        return hit
    bundle = dataset_entry(name).loader(options)
    if isinstance(bundle.train, TensorDataset):
        if len(_LOADED) >= _MAX_CACHED:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = bundle
    return bundle


def iterate_batches(
    bundle: DatasetBundle,
    split: str,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches of ``split`` (train, val or test). Shuffling uses ``generator``
    only, so an epoch's order is a pure function of the seed and epoch: a resumed run sees
    exactly the same batches. Augmentation applies to ``train`` only."""
    ds = bundle.split(split)
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        n = len(y)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx]
            if split == "train" and bundle.augment is not None and generator is not None:
                xb = bundle.augment(xb, generator)
            yield xb, y[idx]
        return
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers
    )
    yield from loader
