"""Built-in datasets: digits (offline default), CIFAR-10/100, an image folder, synthetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from qsearch.data.registry import DatasetBundle, register_dataset
from qsearch.data.splits import stratified_carve
from qsearch.errors import DataError

# The digits test split is fixed (not the trial seed) so every trial is scored on the same
# images; the validation split is carved from the rest with data.split_seed (qsearch.data.splits).
DIGITS_SPLIT_SEED = 0
CARVED = "data.val_fraction of the training split, stratified by class (data.split_seed)"
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def _tensor_bundle(x: torch.Tensor, y: torch.Tensor, test_idx: torch.Tensor,
                   pool: torch.Tensor, opts: Any, **kw: Any) -> DatasetBundle:
    """Train/val/test tensor datasets: ``val`` carved from ``pool`` (the training split)."""
    keep, carve = stratified_carve(y[pool], opts.val_fraction, opts.split_seed)
    train_idx, val_idx = pool[keep], pool[carve]
    val = TensorDataset(x[val_idx], y[val_idx]) if len(val_idx) else None
    return DatasetBundle(
        TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]),
        val=val, val_source=CARVED if val is not None else "none (data.val_fraction: 0)",
        split_indices={"train": train_idx, "val": val_idx, "test": test_idx}, **kw,
    )


DIGITS_CACHE = "datasets/digits-v1.npz"  # under the cache folder (QSEARCH_CACHE)


def _digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits as ``(images (1797, 8, 8) float64, target (1797,) int)``, as
    ``sklearn.datasets.load_digits()`` returns them, kept as a copy in the cache folder.

    Why the copy: importing scikit-learn (scipy, pandas) costs every fresh Ray worker ~1.5 s
    before its first trial; the first process to need digits loads them through
    ``load_digits`` and writes the copy (atomically), every later one reads the copy. A copy
    that cannot be read is ignored and rewritten."""
    import os
    import tempfile

    import numpy as np

    from qsearch.config.defaults import cache_root

    path = cache_root() / DIGITS_CACHE
    try:
        with np.load(path) as z:
            images, target = z["images"], z["target"]
        if images.shape == (1797, 8, 8) and target.shape == (1797,):
            return images, target
    except Exception:  # noqa: BLE001 - missing, torn or foreign file: load and rewrite
        pass
    from sklearn.datasets import load_digits

    d = load_digits()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=d.images, target=d.target)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the import next time
    return d.images, d.target


@register_dataset("digits", description="scikit-learn's bundled 8x8 digits (1797 images, offline)",
                  validation=f"{CARVED}; test: data.test_fraction of the images (fixed seed)")
def digits(opts: Any) -> DatasetBundle:
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * opts.test_fraction))
    test_idx, pool = perm[:n_test], perm[n_test:]
    # Normalised with the statistics of the whole training split (train + val, two scalars),
    # never the test images: the test tensors are the same whatever data.val_fraction is.
    mean, std = x[pool].mean(), x[pool].std()
    x = (x - mean) / std
    return _tensor_bundle(x, y, test_idx, pool, opts, num_classes=10, input_shape=(1, 8, 8))


@register_dataset("synthetic", description="random class-conditional images (smoke tests only)",
                  validation=f"{CARVED}; test: the first data.test_fraction of the samples")
def synthetic(opts: Any) -> DatasetBundle:
    c, s, k, n = opts.channels, opts.image_size, opts.num_classes, opts.num_samples
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.randn(k, c, s, s, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, c, s, s, generator=g)
    n_test = max(1, int(round(n * opts.test_fraction)))
    return _tensor_bundle(x, y, torch.arange(n_test), torch.arange(n_test, n), opts,
                          num_classes=k, input_shape=(c, s, s))


class _Subset(Dataset):
    """Samples ``indices`` of ``base`` (which yields untransformed images) with ``transform``:
    the training and validation parts of one split get different transforms."""

    def __init__(self, base: Any, indices: torch.Tensor, transform: Any):
        self.base, self.indices, self.transform = base, indices.tolist(), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, target = self.base[self.indices[i]]
        return self.transform(img), target


def _carve_folder(base: Any, targets: Any, train_tf: Any, eval_tf: Any, opts: Any,
                  source: str) -> dict[str, Any]:
    """Train and val parts of a torchvision training split (val without augmentation)."""
    keep, carve = stratified_carve(targets, opts.val_fraction, opts.split_seed)
    return {"train": _Subset(base, keep, train_tf),
            "val": _Subset(base, carve, eval_tf) if len(carve) else None,
            "val_source": source if len(carve) else "none (data.val_fraction: 0)",
            "split_indices": {"train": keep, "val": carve}}


def _cifar(name: str, opts: Any) -> DatasetBundle:
    import torchvision
    from torchvision import transforms as T

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    norm = T.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if opts.augment else []
    eval_tf = T.Compose([T.ToTensor(), norm])
    try:
        base = cls(opts.root, train=True, download=opts.download)
        test = cls(opts.root, train=False, download=opts.download, transform=eval_tf)
    except RuntimeError as e:
        raise DataError(
            f"data.root: {name} not found under {Path(opts.root).resolve()} ({e}); put the "
            f"dataset there, point data.root at it, or set data.download=true"
        ) from e
    parts = _carve_folder(base, base.targets, T.Compose([*train_tf, T.ToTensor(), norm]),
                          eval_tf, opts, f"{CARVED} (the 50k training images)")
    return DatasetBundle(test=test, num_classes=len(base.classes), input_shape=(3, 32, 32),
                         **parts)


_CIFAR_VAL = f"{CARVED}, not augmented; test: the 10k test images"


@register_dataset("cifar10", description="CIFAR-10 via torchvision (data.root, data.download)",
                  validation=_CIFAR_VAL)
def cifar10(opts: Any) -> DatasetBundle:
    return _cifar("cifar10", opts)


@register_dataset("cifar100", description="CIFAR-100 via torchvision (data.root, data.download)",
                  validation=_CIFAR_VAL)
def cifar100(opts: Any) -> DatasetBundle:
    return _cifar("cifar100", opts)


IMAGEFOLDER_DESCRIPTION = ("ImageFolder at data.path: train/, val/ (the test split), "
                           "optional valid/")


@register_dataset("imagefolder", description=IMAGEFOLDER_DESCRIPTION,
                  validation="valid/ when it exists, else data.val_fraction of train/, "
                             "stratified by class (data.split_seed); val/ is the test split")
def imagefolder(opts: Any) -> DatasetBundle:
    import torchvision
    from torchvision import transforms as T

    if not opts.path:
        raise DataError("data.path: imagefolder needs data.path=<dir with train/ and val/>")
    root = Path(opts.path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data.path: {root / split} is not a directory (need train/ and val/)")
    size = opts.image_size
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([*([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if opts.augment
                            else [T.Resize(size), T.CenterCrop(size)]), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(size * 1.14)), T.CenterCrop(size), T.ToTensor(), norm])
    # ImageNet-style folders call the test split val/; a separate validation set is valid/.
    test = torchvision.datasets.ImageFolder(str(root / "val"), eval_tf)
    if (root / "valid").is_dir():
        train = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
        val = torchvision.datasets.ImageFolder(str(root / "valid"), eval_tf)
        if val.classes != train.classes:
            raise DataError(f"data.path: {root / 'valid'} has other classes than "
                            f"{root / 'train'}; the validation split needs the same class folders")
        parts: dict[str, Any] = {"train": train, "val": val, "val_source": f"{root / 'valid'}"}
        classes = train.classes
    else:
        base = torchvision.datasets.ImageFolder(str(root / "train"))
        parts = _carve_folder(base, base.targets, train_tf, eval_tf, opts,
                              f"{CARVED} ({root / 'train'})")
        classes = base.classes
    return DatasetBundle(test=test, num_classes=len(classes), input_shape=(3, size, size),
                         **parts)
