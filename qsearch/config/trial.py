"""Typed, versioned trial configuration.

A :class:`TrialConfig` is everything one run of the shared trainer needs. It is plain data
(pydantic v2), loadable from YAML/JSON, and is what the search service samples. Every invalid
value becomes a :class:`~qsearch.errors.ConfigError` naming the dotted field and what is
allowed, so the CLI and the study validator can report it before any work starts.

The ``methods`` section is assembled from the method registry
(:mod:`qsearch.config.methods`): each registered method contributes its own typed section.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    ValidationError,
    field_validator,
    model_validator,
)

from qsearch.config import catalog
from qsearch.config.base import (
    FP32_BITS,
    StrictModel,
    apply_overrides,
    check_bits,
    config_error_from_validation,
)
from qsearch.config.defaults import cache_root
from qsearch.config.files import read_mapping
from qsearch.config.methods import MethodsView, method_entry, parse_methods
from qsearch.errors import ConfigError

TRIAL_CONFIG_VERSION = 1


class LayerRule(StrictModel):
    """Precision of the layers one rule matches; a field left out falls back to the default."""

    w_bits: int | None = None
    a_bits: int | None = None

    _bits = field_validator("w_bits", "a_bits")(check_bits)


class DataConfig(StrictModel):
    """Dataset options. Which fields matter depends on the dataset (see `qsearch datasets`)."""

    root: str = "./data"
    download: bool = False
    path: str | None = None
    num_samples: int = Field(1024, ge=16)
    image_size: int = Field(32, ge=4)
    channels: int = Field(3, ge=1)
    num_classes: int = Field(10, ge=2)
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    #: Fraction of the training split held out as the validation split, stratified by class.
    #: The search selects on validation; the test split is measured once, at a trial's end.
    #: 0 trains on the whole training split (no validation data: not allowed in a search).
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    #: Seed of the validation carve; fixed, independent of the trial seed, so every trial of a
    #: study is trained and scored on the same images.
    split_seed: int = Field(0, ge=0)
    augment: bool = True


class WarmStartConfig(StrictModel):
    """FP32 pre-training recipe. Trained once per (model, dataset, seed, recipe) and cached."""

    enabled: bool = True
    epochs: int = Field(8, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    cache_dir: str | None = None

    def resolved_cache_dir(self) -> Path:
        return cache_root(self.cache_dir) / "warmstart"


def _serialize_methods(view: MethodsView, info: SerializationInfo) -> dict[str, Any]:
    return view.dump(mode="json" if info.mode_is_json() else "python")


def _validate_methods(value: Any) -> MethodsView:
    return value if isinstance(value, MethodsView) else MethodsView(parse_methods(value))


#: ``methods``: one section per registered method, each off until ``enabled: true``.
MethodsField = Annotated[MethodsView, PlainValidator(_validate_methods),
                         PlainSerializer(_serialize_methods)]


def import_plugins(names: Any, field: str = "plugins") -> None:
    """Import plug-in modules (they register methods and objectives when imported).

    A plug-in must be importable wherever the config is parsed: the driver, every Ray
    worker, and ``qsearch eval``; so the config names it, and each of those imports it."""
    if not names:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(field, "expected a list of importable module names")
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
            raise ConfigError(field, f"cannot import plug-in module {name!r} "
                              f"({type(e).__name__}: {e}); install it or put it on PYTHONPATH "
                              "on the driver and every worker") from None


class TrialConfig(StrictModel):
    """One trial of the shared QAT trainer."""

    version: Literal[1] = TRIAL_CONFIG_VERSION
    #: Modules imported before the rest is validated: plug-ins registering methods/objectives.
    plugins: list[str] = Field(default_factory=list)
    model: str = "tiny-cnn"
    dataset: str = "digits"
    data: DataConfig = Field(default_factory=DataConfig)

    epochs: int = Field(5, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.02, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    #: Nesterov SGD (plain heavy-ball momentum by default, as the methods' papers use).
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1)

    # Precision: uniform default, first/last layer override, then per-layer rules
    # (exact module name first, then ``re:<regex>``).
    w_bits: int = 4
    a_bits: int = 4
    first_bits: int | None = 8
    last_bits: int | None = 8
    layers: dict[str, LayerRule] = Field(default_factory=dict)

    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    methods: MethodsField = Field(default_factory=lambda: MethodsView(parse_methods({})))

    _bits = field_validator("w_bits", "a_bits", "first_bits", "last_bits")(check_bits)

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, data: Any) -> Any:
        if isinstance(data, dict):
            import_plugins(data.get("plugins"))
        return data

    @field_validator("model", "dataset")
    @classmethod
    def _known_name(cls, value: str, info: Any) -> str:
        kind = info.field_name
        names = catalog.model_names() if kind == "model" else catalog.dataset_names()
        if value not in names:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(names)}")
        return value

    @field_validator("layers")
    @classmethod
    def _patterns_compile(cls, value: dict[str, LayerRule]) -> dict[str, LayerRule]:
        import re

        for key in value:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise ConfigError(f"layers.{key}", f"not a valid regular expression: {e}"
                                      ) from None
        return value

    @model_validator(mode="after")
    def _methods_compose(self) -> TrialConfig:
        for name in self.methods.enabled():
            self.methods[name].check(self)
        return self

    # ------------------------------------------------------------------ helpers
    def precision_set_by_method(self) -> bool:
        """True when an enabled method picks the weight bits itself (e.g. CSQ)."""
        return any(method_entry(n).config.sets_precision for n in self.methods.enabled())

    def has_quantized_weights(self) -> bool:
        """Whether at least one layer can end up with quantized weights."""
        if self.precision_set_by_method():
            return True
        bits = [self.w_bits, self.first_bits, self.last_bits]
        bits += [r.w_bits for r in self.layers.values()]
        return any(b is not None and b < FP32_BITS for b in bits)

    def content_hash(self) -> str:
        """Stable hash of the whole config (used for provenance and cache keys)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def parse_trial_config(data: dict[str, Any], prefix: str = "") -> TrialConfig:
    """Validate a mapping as a TrialConfig, raising ConfigError on the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as e:
        raise config_error_from_validation(e, prefix, root=TrialConfig) from None


def load_trial_config(path: str | None = None, sets: list[str] | None = None) -> TrialConfig:
    """Load a TrialConfig from an optional YAML/JSON file plus ``--set`` overrides."""
    data = read_mapping(path, what="trial config") if path else {}
    return parse_trial_config(apply_overrides(data, sets or []))
