"""True size of an exported ONNX model, next to the study's ``size_mb``.

The study's ``size_mb`` (qsearch.cost) is a model of deployment size: every quantized weight
at its grid width (``params * w_bits`` bits), plus 32 bits for each biases, BN parameter and
running statistic and each enabled quantizer's step. The ONNX file differs from it by:

* **storage padding**: 2/3-bit grids are stored as INT4 nibbles, 5-7-bit grids as INT8;
* **zero points** (one INT4/INT8 scalar per Q/DQ pair) and **clip bounds** (two floats in
  front of a QuantizeLinear whose grid is narrower than its storage type), which the study
  does not count;
* **BN folded** into FP32 convs: the study counts 4 floats per channel (gamma, beta, mean,
  var), the ONNX file one bias per channel;
* **graph overhead**: the protobuf itself, node definitions, tensor names, shape constants.

:func:`size_report` measures each of these from the file, so the items add up to the
difference (``residual`` is what is left, ~0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qsearch.deploy.onnx_eval import onnx_metadata
from qsearch.deploy.onnx_export import packed_bytes

_DTYPE = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 10: "FLOAT16",
          11: "DOUBLE", 21: "UINT4", 22: "INT4"}
_GROUP = {"INT4": "int4", "UINT4": "int4", "INT8": "int8", "UINT8": "int8", "FLOAT": "float32"}


def size_report(onnx_path: str | Path, *, study_size_mb: float | None = None) -> dict[str, Any]:
    """Byte counts of ``onnx_path``: file, initializers by role and by dtype, and (with
    ``study_size_mb``) the itemised difference to the study's size."""
    import numpy as np
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path))
    g = model.graph
    role: dict[str, str] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            if n.op_type == "DequantizeLinear" and i == 0:
                r = "weights"
            elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                r = "scales" if i == 1 else "zero_points"
            elif n.op_type == "Clip" and i > 0:
                r = "clip_bounds"
            elif n.op_type == "BatchNormalization" and i > 0:
                r = "batchnorm"
            elif n.op_type in ("Conv", "Gemm", "MatMul") and i == 1:
                r = "weights"
            elif n.op_type in ("Conv", "Gemm") and i == 2:
                r = "bias"
            else:
                r = "other"
            role.setdefault(name, r)
    by_role: dict[str, int] = {}
    by_dtype: dict[str, int] = {}
    weights_by_dtype: dict[str, int] = {}
    weight_elems: dict[str, tuple[int, str]] = {}
    for t in g.initializer:
        dt = _DTYPE.get(t.data_type, str(t.data_type))
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        b = packed_bytes(n, dt)
        r = role.get(t.name, "other")
        by_role[r] = by_role.get(r, 0) + b
        grp = _GROUP.get(dt, dt.lower())
        by_dtype[grp] = by_dtype.get(grp, 0) + b
        if r == "weights":
            weights_by_dtype[grp] = weights_by_dtype.get(grp, 0) + b
            weight_elems[t.name] = (n, dt)
    tensor_bytes = sum(by_role.values())
    file_bytes = os.path.getsize(path)
    rep: dict[str, Any] = {
        "file": str(path), "file_bytes": file_bytes, "tensor_bytes": tensor_bytes,
        "graph_overhead_bytes": file_bytes - tensor_bytes,
        "weights_bytes_by_dtype": weights_by_dtype, "bytes_by_dtype": by_dtype,
        "bytes_by_role": by_role,
    }
    if study_size_mb is None:
        return rep
    meta = onnx_metadata(model)
    padding_bits = 0
    for _layer, p in (meta.get("precision") or {}).items():
        n, dt = weight_elems.get(p.get("weight"), (0, "FLOAT"))
        storage = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8}.get(dt)
        if storage is not None:
            padding_bits += n * (storage - int(p["w_bits"]))
    bn_delta = 0
    for f in (meta.get("folded_bn") or {}).values():
        c = int(f["channels"])
        # study: 4C BN floats (+ C bias if the conv had one); file: C bias floats.
        bn_delta += 4 * (c - 4 * c - (c if f.get("had_bias") else 0))
    study_bytes = study_size_mb * 1e6
    items = {
        "storage_padding": padding_bits / 8,
        "zero_points": by_role.get("zero_points", 0),
        "clip_bounds": by_role.get("clip_bounds", 0),
        "batchnorm_folded": bn_delta,
        "shape_constants": by_role.get("other", 0),
        "graph_overhead": file_bytes - tensor_bytes,
    }
    diff = file_bytes - study_bytes
    rep.update({"study_size_mb": study_size_mb, "study_bytes": study_bytes,
                "difference_bytes": diff, "explained": items,
                "residual_bytes": diff - sum(items.values())})
    return rep


def _kb(b: float) -> str:
    return f"{b / 1e3:,.1f} kB"


def format_size_report(rep: dict[str, Any]) -> str:
    lines = [f"ONNX file {rep['file']}: {rep['file_bytes']:,} bytes ({_kb(rep['file_bytes'])})",
             "  weights packed: " + ", ".join(f"{k} {_kb(v)}" for k, v in
                                              sorted(rep["weights_bytes_by_dtype"].items())),
             "  all tensors by role: " + ", ".join(f"{k} {_kb(v)}" for k, v in
                                                   sorted(rep["bytes_by_role"].items())),
             f"  graph overhead (protobuf, nodes, names): {_kb(rep['graph_overhead_bytes'])}"]
    if "study_bytes" in rep:
        lines.append(f"  study size_mb {rep['study_size_mb']:.6g} MB = {_kb(rep['study_bytes'])}; "
                     f"file - study = {_kb(rep['difference_bytes'])}:")
        lines.append("    " + ", ".join(f"{k.replace('_', ' ')} {_kb(v)}"
                                        for k, v in rep["explained"].items())
                     + f"; residual {rep['residual_bytes']:,.0f} bytes")
    return "\n".join(lines)
