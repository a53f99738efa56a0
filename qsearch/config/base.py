"""The shared pieces of every config: strict pydantic models, bit checks, and how validation
errors become one :class:`~qsearch.errors.ConfigError` naming the dotted field.

Reading files and applying ``--set`` overrides live here too, so the study spec and the
trial config load the same way. This module, like all of :mod:`qsearch.config`, never
imports torch: reading a spec, listing studies or printing a front must start in well under
a second.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from qsearch.errors import ConfigError

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
FP32_BITS = 32


def check_bits(value: int | None) -> int | None:
    """Bits are 2..8, or 32 meaning 'not quantized'."""
    if value is not None and value not in ALLOWED_BITS:
        raise ValueError("must be one of 2..8 or 32 (32 = not quantized)")
    return value


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: How many characters of a bad value an error message may show.
MAX_SHOWN = 80


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters (an error never prints a huge
    value, e.g. a YAML alias bomb expanded)."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "<root>"


def _fields_here(root: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section an unknown key ``loc`` sits in."""
    model: Any = root
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(getattr(model, "model_fields", {}) or [])


def config_error_from_validation(err: ValidationError, prefix: str = "",
                                 root: type[BaseModel] | None = None) -> ConfigError:
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
        here = _fields_here(root, tuple(first["loc"]))
        msg = "unknown field; check the spelling" + (
            f" (fields here: {', '.join(here)})" if here else "")
    elif "input" in first and first["type"] not in ("missing",):
        msg = f"{msg} (got {shown(first['input'])})"
    more = len(err.errors()) - 1
    if more:
        msg += f" [and {more} more error{'s' if more > 1 else ''}]"
    return ConfigError(field, msg)


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
    import yaml

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
