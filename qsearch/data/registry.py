"""Dataset registry: ``@register_dataset`` on a loader ``(DataConfig) -> DatasetBundle``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from qsearch.config.catalog import DatasetInfo, declare_dataset
from qsearch.errors import ConfigError


@dataclass
class DatasetBundle:
    """Train/test splits plus what a model builder needs to know."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    # In-memory tensor datasets can be batched without a DataLoader (much faster for tiny data).
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]


Loader = Callable[[Any], DatasetBundle]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Loader
    description: str


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, description: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, fn, description)
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


def load_dataset(name: str, options: Any) -> DatasetBundle:
    return dataset_entry(name).loader(options)


def iterate_batches(
    bundle: DatasetBundle,
    split: str,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches. Shuffling uses ``generator`` only, so an epoch's order is a pure
    function of the seed and epoch: a resumed run sees exactly the same batches."""
    ds = bundle.train if split == "train" else bundle.test
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
