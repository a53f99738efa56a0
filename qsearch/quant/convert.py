"""Swap a float model's conv/linear layers for their LSQ-quantized versions."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qsearch.quant.layers import QConv2d, QLinear, QuantLayer
from qsearch.quant.precision import (
    LayerPrecision,
    Precision,
    quantizable_layers,
    resolve_precision,
)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


#: ``factory(name, float_layer, precision, a_signed)``: a replacement layer, or None for LSQ.
LayerFactory = Callable[[str, nn.Module, LayerPrecision, bool | None], nn.Module | None]


def convert(model: nn.Module, precision: Precision,
            factory: LayerFactory | None = None) -> dict[str, QuantLayer]:
    """Replace every nn.Conv2d/nn.Linear in ``model`` (in place) by QConv2d/QLinear at the
    resolved per-layer bits; weight steps are initialised from the current (warm-start)
    weights. ``factory`` may build another layer for some of them (CSQ's bit-plane layers);
    those are returned too. Returns the replaced layers by name, in forward-definition order."""
    plan = resolve_precision(model, precision)
    first = quantizable_layers(model)[0]
    out: dict[str, QuantLayer] = {}
    for name, p in plan.items():
        m = model.get_submodule(name)
        # The first layer sees raw (normalised, possibly negative) input: signed grid.
        signed = True if name == first else None
        q = factory(name, m, p, signed) if factory is not None else None
        if q is None:
            q = (QConv2d if isinstance(m, nn.Conv2d) else QLinear).from_float(
                m, p.w_bits, p.a_bits, a_signed=signed
            )
        _set_submodule(model, name, q)
        out[name] = q
    return out


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers of an already-converted model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
