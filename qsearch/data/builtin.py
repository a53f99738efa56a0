"""Built-in datasets: digits (offline default), CIFAR-10/100, an image folder, synthetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from qsearch.data.registry import DatasetBundle, register_dataset
from qsearch.errors import DataError

# The digits split is fixed (not the trial seed) so every trial is scored on the same images.
DIGITS_SPLIT_SEED = 0
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


@register_dataset("digits", description="scikit-learn's bundled 8x8 digits (1797 images, offline)")
def digits(opts: Any) -> DatasetBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * opts.test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return DatasetBundle(
        TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]),
        num_classes=10, input_shape=(1, 8, 8),
    )


@register_dataset("synthetic", description="random class-conditional images (smoke tests only)")
def synthetic(opts: Any) -> DatasetBundle:
    c, s, k, n = opts.channels, opts.image_size, opts.num_classes, opts.num_samples
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.randn(k, c, s, s, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, c, s, s, generator=g)
    n_test = max(1, int(round(n * opts.test_fraction)))
    return DatasetBundle(
        TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test]),
        num_classes=k, input_shape=(c, s, s),
    )


def _cifar(name: str, opts: Any) -> DatasetBundle:
    import torchvision
    from torchvision import transforms as T

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    norm = T.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if opts.augment else []
    try:
        train = cls(opts.root, train=True, download=opts.download,
                    transform=T.Compose([*train_tf, T.ToTensor(), norm]))
        test = cls(opts.root, train=False, download=opts.download,
                   transform=T.Compose([T.ToTensor(), norm]))
    except RuntimeError as e:
        raise DataError(
            f"data.root: {name} not found under {Path(opts.root).resolve()} ({e}); put the "
            f"dataset there, point data.root at it, or set data.download=true"
        ) from e
    return DatasetBundle(train, test, num_classes=len(train.classes), input_shape=(3, 32, 32))


@register_dataset("cifar10", description="CIFAR-10 via torchvision (data.root, data.download)")
def cifar10(opts: Any) -> DatasetBundle:
    return _cifar("cifar10", opts)


@register_dataset("cifar100", description="CIFAR-100 via torchvision (data.root, data.download)")
def cifar100(opts: Any) -> DatasetBundle:
    return _cifar("cifar100", opts)


@register_dataset("imagefolder", description="ImageFolder at data.path with train/ and val/")
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
    train_tf = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if opts.augment else [
        T.Resize(size), T.CenterCrop(size)]
    train = torchvision.datasets.ImageFolder(str(root / "train"), T.Compose([*train_tf, T.ToTensor(), norm]))
    test = torchvision.datasets.ImageFolder(
        str(root / "val"), T.Compose([T.Resize(int(size * 1.14)), T.CenterCrop(size), T.ToTensor(), norm]))
    return DatasetBundle(train, test, num_classes=len(train.classes), input_shape=(3, size, size))
