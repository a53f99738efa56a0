"""Names the trial config accepts for ``model`` and ``dataset``, known without torch.

The model and dataset registries (:mod:`qsearch.models`, :mod:`qsearch.data`) hold the
builders and need torch; validating a spec must not. So each registration also declares its
name and the facts a config check needs here (:func:`declare_model`), and the built-ins are
listed below so a torch-free process knows them without importing their modules. A test keeps
the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str = ""
    input_hint: str = ""
    #: Declares a block split (needed by block replacement).
    has_split: bool = False


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str = ""


_MODELS: dict[str, ModelInfo] = {}
_DATASETS: dict[str, DatasetInfo] = {}


def declare_model(info: ModelInfo) -> None:
    _MODELS[info.name] = info


def declare_dataset(info: DatasetInfo) -> None:
    _DATASETS[info.name] = info


def model_info(name: str) -> ModelInfo | None:
    return _MODELS.get(name)


def model_names() -> list[str]:
    return sorted(_MODELS)


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


for _m in (
    ModelInfo("tiny-cnn", "3-conv CNN for 8x8 digits", "1x8x8", has_split=True),
    ModelInfo("resnet20", "CIFAR ResNet-20, 0.27M params", "3x32x32", has_split=True),
    ModelInfo("vgg-small", "VGG-Small for CIFAR, 4.7M params", "3x32x32", has_split=True),
    ModelInfo("mobilenetv2", "MobileNetV2, CIFAR variant, 2.2M params", "3x32x32",
              has_split=True),
    ModelInfo("resnet18", "torchvision ResNet-18 (ImageNet)", "3x224x224", has_split=True),
    ModelInfo("mobilenet_v2", "torchvision MobileNetV2 (ImageNet)", "3x224x224",
              has_split=True),
):
    declare_model(_m)
for _d in (
    DatasetInfo("digits", "scikit-learn's bundled 8x8 digits (1797 images, offline)"),
    DatasetInfo("synthetic", "random class-conditional images (smoke tests only)"),
    DatasetInfo("cifar10", "CIFAR-10 via torchvision (data.root, data.download)"),
    DatasetInfo("cifar100", "CIFAR-100 via torchvision (data.root, data.download)"),
    DatasetInfo("imagefolder", "ImageFolder at data.path: train/, val/ (the test split), "
                               "optional valid/"),
):
    declare_dataset(_d)
