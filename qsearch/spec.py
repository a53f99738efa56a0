"""Typed, versioned trial configuration.

A :class:`TrialConfig` is everything one run of the shared trainer needs. It is plain data
(pydantic v2), loadable from YAML/JSON, and is what the search service samples. Every invalid
value becomes a :class:`~qsearch.errors.ConfigError` naming the dotted field and what is
allowed, so the CLI and the study validator can report it before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qsearch.errors import ConfigError
from qsearch.methods.blockrep import BlockRepConfig
from qsearch.methods.csq import CSQConfig
from qsearch.methods.gradq import GradQConfig
from qsearch.methods.lts import LTSConfig
from qsearch.methods.tr import TRConfig

TRIAL_CONFIG_VERSION = 1
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)


def check_bits(value: int | None) -> int | None:
    """Bits are 2..8, or 32 meaning 'not quantized'."""
    if value is not None and value not in ALLOWED_BITS:
        raise ValueError("must be one of 2..8 or 32 (32 = not quantized)")
    return value


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    augment: bool = True


class WarmStartConfig(StrictModel):
    """FP32 pre-training recipe. Trained once per (model, dataset, seed, recipe) and cached."""

    enabled: bool = True
    epochs: int = Field(8, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    cache_dir: str | None = None

    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("QSEARCH_CACHE") or "~/.cache/qsearch"
        return Path(base).expanduser() / "warmstart"


class MethodsConfig(StrictModel):
    """One section per QAT technique; each is off (``enabled: false``) by default."""

    lts: LTSConfig = Field(default_factory=LTSConfig)
    tr: TRConfig = Field(default_factory=TRConfig)
    gradq: GradQConfig = Field(default_factory=GradQConfig)
    csq: CSQConfig = Field(default_factory=CSQConfig)
    blockrep: BlockRepConfig = Field(default_factory=BlockRepConfig)

    def enabled(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name).enabled]


class TrialConfig(StrictModel):
    """One trial of the shared QAT trainer."""

    version: Literal[1] = TRIAL_CONFIG_VERSION
    model: str = "tiny-cnn"
    dataset: str = "digits"
    data: DataConfig = Field(default_factory=DataConfig)

    epochs: int = Field(5, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.02, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
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
    methods: MethodsConfig = Field(default_factory=MethodsConfig)

    _bits = field_validator("w_bits", "a_bits", "first_bits", "last_bits")(check_bits)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from qsearch.models import list_models

        if value not in list_models():
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(list_models())}")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from qsearch.data import list_datasets

        if value not in list_datasets():
            raise ValueError(
                f"unknown dataset {value!r}; choose one of {', '.join(list_datasets())}"
            )
        return value

    @model_validator(mode="after")
    def _methods_compose(self) -> TrialConfig:
        from qsearch.methods import check_combination

        check_combination(self)
        return self

    def content_hash(self) -> str:
        """Stable hash of the whole config (used for provenance and cache keys)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "<root>"


def config_error_from_validation(err: ValidationError, prefix: str = "") -> ConfigError:
    """Turn pydantic's error into a ConfigError naming the first bad field."""
    first = err.errors()[0]
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError):
        field = f"{prefix}.{inner.field}" if prefix else inner.field
        return ConfigError(field, str(inner).removeprefix(f"{inner.field}: "))
    field = _loc_to_field(first["loc"])
    if prefix:
        field = f"{prefix}.{field}" if field != "<root>" else prefix
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field; check the spelling (see the TrialConfig fields in the docs)"
    elif "input" in first and first["type"] not in ("missing",):
        msg = f"{msg} (got {first['input']!r})"
    more = len(err.errors()) - 1
    if more:
        msg += f" [and {more} more error{'s' if more > 1 else ''}]"
    return ConfigError(field, msg)


def parse_trial_config(data: dict[str, Any], prefix: str = "") -> TrialConfig:
    """Validate a mapping as a TrialConfig, raising ConfigError on the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as e:
        raise config_error_from_validation(e, prefix) from None
    except ConfigError:
        raise


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON file as a mapping (``yaml.safe_load`` reads both)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the file must contain a mapping at the top level")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed.

    Keys of the ``layers`` map may contain dots (module names), so everything after
    ``layers.`` up to the last component is one key.
    """
    parts = dotted.split(".")
    if parts[0] == "layers" and len(parts) >= 3:
        parts = ["layers", ".".join(parts[1:-1]), parts[-1]]
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(dotted, f"{p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides; values are parsed as YAML scalars (``4``, ``true``)."""
    out = json.loads(json.dumps(data))
    for item in sets:
        if "=" not in item:
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError("--set", f"empty key in {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value)
    return out


def load_trial_config(path: str | None = None, sets: list[str] | None = None) -> TrialConfig:
    """Load a TrialConfig from an optional YAML/JSON file plus ``--set`` overrides."""
    data = read_mapping(path) if path else {}
    return parse_trial_config(apply_overrides(data, sets or []))
