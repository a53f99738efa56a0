"""Encodings sidecar (``<model>.encodings.json``): the quantization of every tensor, AIMET-style.

Layout (AIMET's 0.6.1 encoding file, which QNN/SNPE converters read, plus a ``qsearch`` block)::

    {
      "version": "0.6.1",
      "activation_encodings": {
        "<onnx tensor>": [{"bitwidth": 4, "dtype": "int", "is_symmetric": "False",
                           "scale": 0.083, "offset": 0, "min": 0.0, "max": 1.245}]
      },
      "param_encodings": {
        "<onnx initializer>": [{"bitwidth": 2, "dtype": "int", "is_symmetric": "True",
                                "scale": 0.021, "offset": -2, "min": -0.042, "max": 0.021}]
      },
      "excluded_layers": ["<layer kept in FP32>", ...],
      "quantizer_args": {"activation_bitwidth": ..., "param_bitwidth": ...,
                         "per_channel_quantization": "False", ...},
      "qsearch": {"layers": {"<layer>": {"w_bits", "a_bits", "weight", "weight_dtype",
                                         "activation", "activation_dtype"}}, ...}
    }

Keys are ONNX tensor names: ``param_encodings`` by weight initializer (the PyTorch parameter
name, ``stage2.0.0.weight``), ``activation_encodings`` by the float tensor that a layer
quantizes on its input (the tensor in front of the ``QuantizeLinear``/``Clip``). If two
layers quantize the same tensor at different steps, the second is keyed
``<tensor>@<layer>``. Lists hold one entry: all encodings are per-tensor.

Conventions (AIMET's): ``bitwidth`` is the **true** grid width (a 2-bit layer stored as
ONNX INT4 says 2); ``offset`` is the integer the grid starts at, so the grid is
``scale * [offset, offset + 2^bitwidth - 1]``: ``-2^(b-1)`` for the signed LSQ grid (weights,
the first layer's input), ``0`` for the unsigned one (post-ReLU activations). ONNX zero points
are 0 in both cases; ``min``/``max`` are the grid's end points. ``is_symmetric`` and the
``quantizer_args`` booleans follow AIMET's spelling (strings ``"True"``/``"False"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qsearch.deploy.onnx_export import OnnxExport
from qsearch.quant.lsq import level_bounds

ENCODINGS_VERSION = "0.6.1"


def encoding(bits: int, scale: float, signed: bool) -> dict[str, Any]:
    qn, qp = level_bounds(bits, signed)
    return {"bitwidth": int(bits), "dtype": "int", "is_symmetric": str(bool(signed)),
            "scale": float(scale), "offset": -int(qn), "min": -qn * float(scale),
            "max": qp * float(scale)}


def build_encodings(exp: OnnxExport) -> dict[str, Any]:
    acts: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, list[dict[str, Any]]] = {}
    excluded: list[str] = []
    layers: dict[str, Any] = {}
    for r in exp.layers:
        if r.weight_scale is not None:
            params[r.weight] = [encoding(r.w_bits, r.weight_scale, True)]
        if r.activation is not None and r.activation_scale is not None:
            enc = [encoding(r.a_bits, r.activation_scale, bool(r.activation_signed))]
            key = r.activation
            if key in acts and acts[key] != enc:
                key = f"{key}@{r.name}"
            acts[key] = enc
        if r.weight_scale is None and r.activation is None:
            excluded.append(r.name)
        layers[r.name] = {"kind": r.kind, "w_bits": r.w_bits, "a_bits": r.a_bits,
                          "weight": r.weight, "weight_dtype": r.weight_dtype,
                          "activation": r.activation, "activation_dtype": r.activation_dtype}
    q_a = [r.a_bits for r in exp.layers if r.activation is not None]
    q_w = [r.w_bits for r in exp.layers if r.weight_scale is not None]
    return {
        "version": ENCODINGS_VERSION,
        "activation_encodings": acts,
        "param_encodings": params,
        "excluded_layers": excluded,
        "quantizer_args": {
            # Mixed precision: the most common widths; every tensor states its own.
            "activation_bitwidth": max(set(q_a), key=q_a.count) if q_a else 32,
            "param_bitwidth": max(set(q_w), key=q_w.count) if q_w else 32,
            "dtype": "int", "per_channel_quantization": "False", "quant_scheme": "lsq",
            "is_symmetric": "True",
        },
        "qsearch": {"onnx": exp.path.name, "layers": layers, "folded_bn": exp.folded_bn,
                    "kept_bn": exp.kept_bn},
    }


def encodings_path(onnx_path: str | Path) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.stem + ".encodings.json")


def write_encodings(exp: OnnxExport, path: str | Path | None = None) -> Path:
    out = Path(path) if path is not None else encodings_path(exp.path)
    out.write_text(json.dumps(build_encodings(exp), indent=2))
    return out
