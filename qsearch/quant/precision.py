"""Per-layer precision rules: exact module name, then ``re:`` regex, then first/last, then
the uniform default. A rule that matches no layer is a ConfigError."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qsearch.errors import ConfigError

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerPrecision:
    w_bits: int
    a_bits: int


@dataclass
class Precision:
    """What to quantize to. ``rules`` maps a module name or ``re:<regex>`` to (w, a) bits,
    either of which may be None (= fall back)."""

    w_bits: int = 4
    a_bits: int = 4
    first_bits: int | None = 8
    last_bits: int | None = 8
    rules: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    weight_overrides: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any, weight_overrides: dict[str, int] | None = None) -> Precision:
        """Build from a TrialConfig (duck-typed: quant does not import the spec)."""
        return cls(
            w_bits=cfg.w_bits,
            a_bits=cfg.a_bits,
            first_bits=cfg.first_bits,
            last_bits=cfg.last_bits,
            rules={k: (r.w_bits, r.a_bits) for k, r in cfg.layers.items()},
            weight_overrides=dict(weight_overrides or {}),
        )


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers in forward-definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def resolve_precision(model: nn.Module, precision: Precision) -> dict[str, LayerPrecision]:
    names = quantizable_layers(model)
    if not names:
        raise ConfigError("model", "has no conv or linear layer to quantize")
    regexes: list[tuple[str, re.Pattern[str]]] = []
    for key in precision.rules:
        if key.startswith("re:"):
            try:
                regexes.append((key, re.compile(key[3:])))
            except re.error as e:
                raise ConfigError(f"layers.{key}", f"invalid regular expression: {e}") from None
        elif key not in names:
            raise ConfigError(
                f"layers.{key}",
                f"matches no layer; quantizable layers are: {', '.join(names)}",
            )
    for key, rx in regexes:
        if not any(rx.fullmatch(n) for n in names):
            raise ConfigError(
                f"layers.{key}",
                f"regex matches no layer; quantizable layers are: {', '.join(names)}",
            )
    for key in precision.weight_overrides:
        if key not in names:
            raise ConfigError(f"layers.{key}", "per-layer weight bits name an unknown layer")

    out: dict[str, LayerPrecision] = {}
    for i, name in enumerate(names):
        w, a = precision.w_bits, precision.a_bits
        edge = precision.first_bits if i == 0 else None
        if i == len(names) - 1 and precision.last_bits is not None:
            edge = precision.last_bits
        if edge is not None:
            w = a = edge
        rule = precision.rules.get(name)
        if rule is None:
            rule = next((precision.rules[k] for k, rx in regexes if rx.fullmatch(name)), None)
        if rule is not None:
            w = rule[0] if rule[0] is not None else w
            a = rule[1] if rule[1] is not None else a
        w = precision.weight_overrides.get(name, w)
        out[name] = LayerPrecision(w, a)
    return out
