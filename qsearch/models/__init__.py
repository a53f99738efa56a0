"""Model registry. Importing this package registers every built-in model."""

from qsearch.models import mobilenetv2_cifar, resnet_cifar, tiny_cnn, tv, vgg_small  # noqa: F401
from qsearch.models.registry import (
    ModelEntry,
    ModelSplit,
    build_model,
    list_models,
    model_entry,
    register_model,
)

__all__ = ["ModelEntry", "ModelSplit", "build_model", "list_models", "model_entry", "register_model"]
