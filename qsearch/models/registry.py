"""Model registry: ``@register_model`` on a builder ``(num_classes, in_channels) -> nn.Module``.

Entries are declared once, next to the model; registering a name twice is an error (no
silent overwrite). ``split`` optionally declares how block replacement (BWRF) cuts the model
into aligned blocks; :func:`sequential_split` builds one from submodule names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from qsearch.config.catalog import ModelInfo, declare_model
from qsearch.errors import ConfigError

Builder = Callable[[int, int], nn.Module]
# (model, granularity) -> ModelSplit; granularity is "stage" or "block".
BlockSplit = Callable[[nn.Module, str], "ModelSplit"]
GRANULARITIES = ("stage", "block")


@dataclass
class ModelSplit:
    """A model cut into n aligned blocks plus a head, for block replacement.

    ``head(blocks[n-1](...blocks[0](x))) == model(x)``. The blocks reference the model's own
    submodules (never copies), so splitting the quantized model yields its quantized layers and
    splitting the FP partner its FP layers, block for block. ``names[i]`` is the submodule whose
    forward output *is* block i's output: a forward hook there captures h_i during the ordinary
    ``model(x)`` call, so the quantized backbone runs once per step.
    """

    blocks: list[nn.Module]
    head: nn.Module
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.blocks):
            raise ValueError("ModelSplit needs one tap name per block")


Part = str | nn.Module


def sequential_split(model: nn.Module, groups: list[list[Part]], head: list[Part]) -> ModelSplit:
    """Build a :class:`ModelSplit` from submodule names.

    Each group lists, in call order, submodule names of ``model`` or stateless glue modules
    (``nn.ReLU()``, ``nn.Flatten(1)``) standing in for functional calls in ``forward``; the
    last entry of a group must be a name, the hook point of that block.
    """

    def seq(parts: list[Part]) -> nn.Sequential:
        return nn.Sequential(*(model.get_submodule(p) if isinstance(p, str) else p for p in parts))

    names = []
    for g in groups:
        if not g or not isinstance(g[-1], str):
            raise ValueError("each block group must end with a submodule name (its hook point)")
        names.append(g[-1])
    return ModelSplit([seq(g) for g in groups], seq(head), names)


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(
            "methods.blockrep.granularity",
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}",
        )


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    description: str
    input_hint: str
    split: BlockSplit | None = None


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, description: str, input_hint: str, split: BlockSplit | None = None
) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, fn, description, input_hint, split)
        declare_model(ModelInfo(name, description, input_hint, has_split=split is not None))
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ConfigError("model", f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _MODELS[name]


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    return model_entry(name).builder(num_classes, in_channels)
