"""The search space: distributions over dotted TrialConfig paths, and the checks on them.

A search-space key is a dotted path into :class:`~qsearch.config.trial.TrialConfig`
(``w_bits``, ``methods.lts.warmup_frac``, ``layers.<module>.w_bits``); its value is a
distribution (float, int, categorical) or a fixed value. :func:`check_path` rejects a path
that names no leaf field, and :func:`check_asha` is the one place the ASHA grace-period rule
lives. Torch-free.
"""

from __future__ import annotations

import difflib
import json
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from qsearch.config.base import StrictModel
from qsearch.config.methods import method_config_class, method_names
from qsearch.errors import ConfigError

#: Int ranges up to this many values are checked value by value (bits 2..8 etc.).
_MAX_INT_VALUES_CHECKED = 64


# --------------------------------------------------------------------------- distributions


class FloatDist(StrictModel):
    """Uniform (or log-uniform with ``log: true``) float in [low, high]."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatDist:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high}); "
                             "use a fixed value for a constant")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self

    def boundary_values(self) -> list[Any]:
        return [self.low, self.high]


class IntDist(StrictModel):
    """Integer in [low, high] (inclusive), optional step or log scale."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntDist:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high}); "
                             "use a fixed value for a constant")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step != 1:
            raise ValueError("step and log cannot be combined")
        return self

    def boundary_values(self) -> list[Any]:
        values = list(range(self.low, self.high + 1, self.step))
        if self.log or len(values) > _MAX_INT_VALUES_CHECKED:
            return [self.low, values[-1]]
        return values  # small ranges (bit-widths): every value must be one the trainer takes


class CategoricalDist(StrictModel):
    """One of ``choices`` (str, int, float, bool or null, as Optuna stores them)."""

    type: Literal["categorical"] = "categorical"
    choices: list[Union[None, bool, int, float, str]]

    @field_validator("choices")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("empty choices: give at least one value")
        if len({json.dumps(c) for c in v}) != len(v):
            raise ValueError("choices must be distinct")
        return v

    def boundary_values(self) -> list[Any]:
        return list(self.choices)


class FixedDist(StrictModel):
    """A constant: not searched, but set on every trial (a bare scalar in YAML means this)."""

    type: Literal["fixed"] = "fixed"
    value: Any

    def boundary_values(self) -> list[Any]:
        return [self.value]


Distribution = Annotated[Union[FloatDist, IntDist, CategoricalDist, FixedDist],
                         Field(discriminator="type")]


# --------------------------------------------------------------------------- paths


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated so we can see whether a field is a nested section."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def check_path(path: str) -> None:
    """Raise ConfigError unless ``path`` names a leaf field of TrialConfig.

    ``layers.<module name>.w_bits`` is allowed (module names may contain dots); whether the
    layer exists is only known once the model is built, so the trainer checks that.
    """
    field = f"search_space.{path}"
    parts = path.split(".")
    from qsearch.config.trial import LayerRule, TrialConfig

    model: type[BaseModel] = TrialConfig
    i = 0
    while i < len(parts):
        part = parts[i]
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; fields here: {', '.join(fields)}"
            raise ConfigError(field, f"unknown TrialConfig path ({part!r} is not a field{hint})")
        if path.startswith("layers.") and part == "layers":
            if len(parts) < 3 or parts[-1] not in LayerRule.model_fields:
                raise ConfigError(field, "use layers.<module name>.w_bits or .a_bits")
            return
        if model is TrialConfig and part == "methods":
            if i + 1 >= len(parts):
                raise ConfigError(field, "is a section, not a value; name a method: "
                                  f"{', '.join(method_names())}")
            section = method_config_class(parts[i + 1])
            if section is None:
                raise ConfigError(field, f"unknown method {parts[i + 1]!r}; choose one of "
                                  f"{', '.join(method_names())}")
            if i + 2 >= len(parts):
                raise ConfigError(field, f"is a section, not a value; name one of its fields: "
                                  f"{', '.join(section.model_fields)}")
            model = section
            i += 2
            continue
        ann = _unwrap(fields[part].annotation)
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        last = i == len(parts) - 1
        if is_section and last:
            raise ConfigError(field, f"is a section, not a value; name one of its fields: "
                              f"{', '.join(ann.model_fields)}")
        if not is_section and not last:
            raise ConfigError(field, f"{part!r} is a value, not a section")
        if is_section:
            model = ann
        i += 1


def check_asha(grace_period: int, max_epochs: int) -> None:
    """ASHA needs a rung below the trial length, or it can never stop a trial early."""
    if grace_period >= max_epochs:
        raise ConfigError("scheduler.grace_period", f"must be below the trial length "
                          f"({max_epochs} epochs), or ASHA can never stop a trial early")
