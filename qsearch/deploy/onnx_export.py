"""Export a converted LSQ fake-quant model to ONNX with QuantizeLinear/DequantizeLinear.

The graph other tools load (ONNX Runtime, TensorRT, QNN/AIMET-style toolchains) is built in
two steps:

1. **Float graph.** A copy of the model in which every quantized layer is a plain
   ``nn.Conv2d``/``nn.Linear`` of the same name, whose weight is the *fake-quantized* weight
   (integer levels times the learned step), is exported with ``torch.onnx.export(dynamo=True,
   opset_version=21, optimize=False)``. Only constant folding runs afterwards (onnxscript's
   optimizer would also fuse BatchNormalization into Conv, which would silently change
   quantized weights), and unused nodes are removed. Parameters keep their PyTorch names as
   initializer names (``stage2.0.0.weight``).
2. **Graph edits** (plain ``onnx`` protobuf):

   * **Weights.** The float initializer ``<layer>.weight`` of a quantized layer is replaced
     by an integer initializer of the same name holding the LSQ levels
     ``round(clamp(w / s, -Qn, Qp))``, followed by ``DequantizeLinear(levels, s, 0)``.
     Layers of at most 4 bits are stored as packed ``INT4`` (two values a byte), up to 8 bits
     as ``INT8``. A 2- or 3-bit grid (``[-2, 1]``, ``[-4, 3]``) fits ``INT4``; its true bit
     width is in the encodings sidecar and the ``qsearch.precision`` metadata.
   * **Activations.** Where the trial quantized a layer's input (``a_bits < 32``), that input
     goes through ``QuantizeLinear -> DequantizeLinear`` at the learned step, zero point 0:
     ``INT8``/``INT4`` for a signed grid, ``UINT8``/``UINT4`` for an unsigned (post-ReLU) one.
     ONNX quantizes to the *storage* type's range, so a grid narrower than its storage type
     (2, 3, 5, 6, 7 bits) gets a ``Clip`` to ``[-Qn*s, Qp*s]`` in front of the
     ``QuantizeLinear``; ``clip(round(x/s)) == round(clip(x)/s)`` on an integer grid, so this
     is the LSQ forward exactly.
   * **FP32 layers** (bits 32) keep float weights. When such a Conv feeds only a
     BatchNormalization (eval mode), the BN is folded into the Conv (``W*g/sqrt(v+e)``, bias
     ``(b-m)*g/sqrt(v+e)+beta``): exact up to float rounding. BN after a **quantized** conv is
     kept as its own op: folding it would rescale the weights per output channel, and the
     folded weights are no longer on the per-tensor LSQ grid the model was trained (and
     scored) with; ONNX Runtime runs BN after the DQ->Conv in float, as PyTorch does.

Rounding: PyTorch's LSQ multiplies by ``1/s`` before rounding, QuantizeLinear divides by
``s``; both round half to even. The two differ only where ``x/s`` lies within an ulp of a
``.5`` tie, and accumulated float differences of the convs can move a value across a tie,
so an activation can land one quantization step away in rare elements (see
``onnx_eval.compare_with_torch``).

The model's ``metadata_props`` carry ``qsearch.*`` keys (JSON values): format version, the
dataset and its options, the input shape, the per-layer precision and what was folded, plus
whatever the caller passes (study, trial, stored accuracy and size), so ``qsearch eval
model.onnx`` needs nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qsearch.errors import ConfigError
from qsearch.quant.layers import QConv2d, QLinear, QuantLayer
from qsearch.quant.lsq import level_bounds

OPSET = 21
ONNX_FORMAT = "qsearch-onnx"
ONNX_FORMAT_VERSION = 1
META_PREFIX = "qsearch."
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class LayerQuant:
    """What the ONNX graph holds for one quantized (or FP32) conv/linear layer."""

    name: str
    kind: str  # "conv" | "linear"
    w_bits: int
    a_bits: int
    weight: str  # ONNX initializer name (== the PyTorch parameter name)
    weight_dtype: str  # "INT4" | "INT8" | "FLOAT"
    weight_scale: float | None = None
    weight_numel: int = 0
    activation: str | None = None  # ONNX tensor that is quantized (the layer's input)
    activation_dtype: str | None = None  # "INT8" | "UINT8" | "INT4" | "UINT4"
    activation_scale: float | None = None
    activation_signed: bool | None = None
    clipped: bool = False  # a Clip in front of QuantizeLinear (grid narrower than storage)


@dataclass
class OnnxExport:
    path: Path
    layers: list[LayerQuant]
    folded_bn: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_bn: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


def storage_type(bits: int, signed: bool, min_bits: int = 4) -> str:
    """ONNX integer type that holds a ``bits``-bit LSQ grid (at least ``min_bits`` wide)."""
    if bits <= 4 and min_bits <= 4:
        return "INT4" if signed else "UINT4"
    if bits <= 8:
        return "INT8" if signed else "UINT8"
    raise ConfigError("precision", f"{bits}-bit quantization has no ONNX integer type "
                      "(QuantizeLinear goes up to 8 bits here; use <= 8 or 32)")


def _np_dtype(onnx_type: str) -> Any:
    import ml_dtypes

    return {"INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4, "INT8": np.int8,
            "UINT8": np.uint8}[onnx_type]


def _float_copy(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[QuantLayer, Any]]]:
    """A copy of ``model`` with plain conv/linear layers holding the fake-quantized weights,
    and per layer (original module, integer levels or None)."""
    plain = copy.deepcopy(model).eval()
    info: dict[str, tuple[QuantLayer, Any]] = {}
    for name, q in list(model.named_modules()):
        if not isinstance(q, QuantLayer):
            continue
        with torch.no_grad():
            w = q.weight if q.weight_transform is None else q.weight_transform(q.weight)
            w = w.detach().float()
            levels = None
            if q.w_quant.enabled:
                levels = q.w_quant.levels(w)
                w = levels * q.w_quant.step.detach().reshape(())
        if isinstance(q, QConv2d):
            m: nn.Module = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride,
                                     q.padding, q.dilation, q.groups, q.bias is not None)
        elif isinstance(q, QLinear):
            m = nn.Linear(q.in_features, q.out_features, q.bias is not None)
        else:  # pragma: no cover - only two quantized layer kinds exist
            raise ConfigError("model", f"cannot export quantized layer {name} of type "
                              f"{type(q).__name__}")
        with torch.no_grad():
            m.weight.copy_(w)
            if q.bias is not None:
                m.bias.copy_(q.bias.detach())
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, m.eval())
        info[name] = (q, None if levels is None else levels.to(torch.int8).numpy())
    return plain, info


def _torch_export(plain: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """Float ONNX ModelProto of ``plain`` (dynamic batch), constant-folded, BN not fused."""
    import onnx_ir as ir
    import onnxscript.optimizer as oopt

    dummy = torch.zeros(2, *input_shape)  # batch 2: a size-1 dim would be specialised
    batch = torch.export.Dim("batch")
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), torch.no_grad():
            prog = torch.onnx.export(plain, (dummy,), dynamo=True, opset_version=OPSET,
                                     optimize=False, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                     verbose=False, external_data=False)
    except Exception as e:
        raise ConfigError("model", f"torch.onnx.export failed for input shape "
                          f"{tuple(input_shape)}: {str(e).splitlines()[0][:300]}") from e
    model = prog.model
    oopt.fold_constants(model)
    oopt.remove_unused_nodes(model)
    return ir.serde.serialize_model(model)


class _Graph:
    """Small helper over a GraphProto: initializers, consumers, node insertion."""

    def __init__(self, graph: Any):
        self.g = graph
        self.inits = {t.name: t for t in graph.initializer}

    def consumers(self, tensor: str) -> list[Any]:
        return [n for n in self.g.node if tensor in n.input]

    def producer(self, tensor: str) -> Any:
        return next((n for n in self.g.node if tensor in n.output), None)

    def is_graph_output(self, tensor: str) -> bool:
        return any(o.name == tensor for o in self.g.output)

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def set_init(self, name: str, arr: np.ndarray) -> None:
        from onnx import numpy_helper

        t = numpy_helper.from_array(arr, name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            self.g.initializer.append(t)
            self.inits[name] = self.g.initializer[-1]

    def insert_before(self, anchor: Any, nodes: list[Any]) -> None:
        idx = list(self.g.node).index(anchor)
        for k, n in enumerate(nodes):
            self.g.node.insert(idx + k, n)

    def remove_node(self, node: Any) -> None:
        self.g.node.remove(node)

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.g.node for i in n.input}
        for t in list(self.g.initializer):
            if t.name not in used:
                self.g.initializer.remove(t)
                self.inits.pop(t.name, None)


def _fold_bn(gr: _Graph, conv: Any) -> dict[str, Any] | None:
    """Fold an eval-mode BatchNormalization that alone consumes ``conv``'s output into the
    conv's float weight and bias. Returns what was folded, or None when it does not apply."""
    out = conv.output[0]
    users = gr.consumers(out)
    if len(users) != 1 or users[0].op_type != "BatchNormalization" or gr.is_graph_output(out):
        return None
    bn = users[0]
    if len(bn.output) != 1 or any(i not in gr.inits for i in bn.input[1:5]):
        return None
    if conv.input[1] not in gr.inits:
        return None
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (gr.array(i).astype(np.float64) for i in bn.input[1:5])
    w = gr.array(conv.input[1]).astype(np.float64)
    had_bias = len(conv.input) > 2 and conv.input[2] != ""
    b = gr.array(conv.input[2]).astype(np.float64) if had_bias else np.zeros(w.shape[0])
    k = gamma / np.sqrt(var + eps)
    w_name = conv.input[1]
    b_name = conv.input[2] if had_bias else w_name.rsplit(".", 1)[0] + ".bias"
    gr.set_init(w_name, (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32))
    gr.set_init(b_name, ((b - mean) * k + beta).astype(np.float32))
    if had_bias:
        conv.input[2] = b_name
    else:
        conv.input.append(b_name)
    conv.output[0] = bn.output[0]
    gr.remove_node(bn)
    return {"channels": int(w.shape[0]), "had_bias": bool(had_bias), "bn": bn.name}


def _compute_node(gr: _Graph, weight: str) -> Any:
    """The Conv/Gemm/MatMul that consumes ``weight`` (through a Transpose if need be)."""
    users = gr.consumers(weight)
    if len(users) == 1 and users[0].op_type == "Transpose":
        users = gr.consumers(users[0].output[0])
    users = [n for n in users if n.op_type in ("Conv", "Gemm", "MatMul")]
    if len(users) != 1:
        raise ConfigError("model", f"cannot locate the single Conv/Gemm/MatMul using {weight} "
                          "in the exported graph")
    return users[0]


def _quantize_graph(proto: Any, info: dict[str, tuple[QuantLayer, Any]],
                    act_types: str) -> OnnxExport:
    from onnx import helper

    gr = _Graph(proto.graph)
    # The exporter's value_info types the float weights; the edits retype them (and shape
    # inference in the checker recomputes everything), so drop it.
    del proto.graph.value_info[:]
    exp = OnnxExport(path=Path(), layers=[])
    # The exporter gives a bias-less conv an all-zero bias; drop it (adding 0 is exact).
    for node in gr.g.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in gr.inits \
                and not np.any(gr.array(node.input[2])):
            del node.input[2]
    # FP32 convs (including plain, never-converted ones): fold the BN that follows.
    for node in list(gr.g.node):
        if node.op_type != "Conv" or node.input[1] not in gr.inits:
            continue
        layer = node.input[1].rsplit(".", 1)[0]
        q = info.get(layer, (None, None))
        if q[1] is None:  # weight stays float
            r = _fold_bn(gr, node)
            if r:
                exp.folded_bn[layer] = r
    exp.kept_bn = [n.name or n.output[0] for n in gr.g.node if n.op_type == "BatchNormalization"]

    for name, (q, levels) in info.items():
        wname = f"{name}.weight"
        if wname not in gr.inits:
            raise ConfigError("model", f"weight {wname} is not an initializer of the exported "
                              "graph (was it folded or renamed?)")
        node = _compute_node(gr, wname)
        kind = "conv" if isinstance(q, QConv2d) else "linear"
        rec = LayerQuant(name=name, kind=kind, w_bits=q.w_bits, a_bits=q.a_bits, weight=wname,
                         weight_dtype="FLOAT", weight_numel=int(q.weight.numel()))
        pre: list[Any] = []
        if levels is not None:
            dtype = storage_type(q.w_bits, True)
            s = float(q.w_quant.step.detach().reshape(()))
            gr.set_init(wname, levels.astype(_np_dtype(dtype)))
            gr.set_init(f"{wname}_scale", np.array(s, dtype=np.float32))
            gr.set_init(f"{wname}_zero_point", np.array(0, dtype=_np_dtype(dtype)))
            dq = f"{wname}_dq"
            for user in gr.consumers(wname):
                for i, inp in enumerate(user.input):
                    if inp == wname:
                        user.input[i] = dq
            pre.append(helper.make_node("DequantizeLinear",
                                        [wname, f"{wname}_scale", f"{wname}_zero_point"], [dq],
                                        name=f"{name}/weight_dq"))
            rec.weight_dtype, rec.weight_scale = dtype, s
        if q.a_quant.enabled:
            signed = q.a_quant.signed
            dtype = storage_type(q.a_bits, signed, 4 if act_types == "int4" else 8)
            s = float(q.a_quant.step.detach().reshape(()))
            qn, qp = level_bounds(q.a_bits, signed)
            x = node.input[0]
            base = f"{name}.input"
            gr.set_init(f"{base}_scale", np.array(s, dtype=np.float32))
            gr.set_init(f"{base}_zero_point", np.array(0, dtype=_np_dtype(dtype)))
            src = x
            storage_bits = 4 if dtype.endswith("INT4") else 8
            clipped = q.a_bits != storage_bits
            if clipped:
                gr.set_init(f"{base}_clip_min", np.array(-qn * s, dtype=np.float32))
                gr.set_init(f"{base}_clip_max", np.array(qp * s, dtype=np.float32))
                pre.append(helper.make_node("Clip", [x, f"{base}_clip_min", f"{base}_clip_max"],
                                            [f"{base}_clipped"], name=f"{name}/input_clip"))
                src = f"{base}_clipped"
            pre.append(helper.make_node("QuantizeLinear",
                                        [src, f"{base}_scale", f"{base}_zero_point"],
                                        [f"{base}_q"], name=f"{name}/input_q"))
            pre.append(helper.make_node("DequantizeLinear",
                                        [f"{base}_q", f"{base}_scale", f"{base}_zero_point"],
                                        [f"{base}_dq"], name=f"{name}/input_dq"))
            node.input[0] = f"{base}_dq"
            rec.activation, rec.activation_dtype = x, dtype
            rec.activation_scale, rec.activation_signed, rec.clipped = s, signed, clipped
        # Insert in front of the first node that reads any of the new tensors (keeps the graph
        # topologically sorted: the new nodes read only initializers and ``x``).
        if pre:
            new_out = {o for n in pre for o in n.output}
            anchor = next(n for n in gr.g.node if new_out & set(n.input))
            gr.insert_before(anchor, pre)
        exp.layers.append(rec)
    gr.drop_unused_initializers()
    return exp


def _strip_debug_info(proto: Any) -> None:
    """Drop the exporter's per-node stack traces and namespaces (a third of a small file)."""
    for n in proto.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    for v in (*proto.graph.input, *proto.graph.output, *proto.graph.initializer):
        del v.metadata_props[:]
        v.doc_string = ""
    del proto.graph.metadata_props[:]


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = META_PREFIX + k, json.dumps(v)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
                metadata: dict[str, Any] | None = None, act_types: str = "int8",
                check: bool = True) -> OnnxExport:
    """Write ``model`` (a converted LSQ model with trained weights, or a plain float model)
    to ``path`` as an opset-21 QDQ ONNX model with a dynamic batch dimension.

    ``input_shape`` is (C, H, W) of one sample. ``metadata`` entries are stored as
    ``qsearch.<key>`` metadata_props (JSON). Returns what was exported per layer.

    ``act_types`` picks the activation Q/DQ types: ``"int8"`` (default) uses INT8/UINT8 for
    every quantized activation, with a ``Clip`` to the true grid when it is narrower than 8
    bits; ``"int4"`` uses INT4/UINT4 for grids of at most 4 bits. Activations are not stored,
    so this changes no byte of the file's weights; it decides who can run the graph: ONNX
    Runtime (1.32) runs 4-bit *activation* Q/DQ only with graph optimisation at ``BASIC`` (its
    extended QDQ transformers reject a 4-bit zero point after ``Clip``/``Relu`` and propagate
    4-bit Q/DQ through MaxPool, which has no 4-bit kernel), while the 8-bit form runs at every
    level. The true activation widths are in the encodings sidecar either way.
    """
    import onnx

    if act_types not in ("int8", "int4"):
        raise ConfigError("act_types", f"choose int8 or int4, not {act_types!r}")

    path = Path(path)
    model = model.eval()
    plain, info = _float_copy(model)
    proto = _torch_export(plain, tuple(input_shape))
    exp = _quantize_graph(proto, info, act_types)
    _strip_debug_info(proto)
    proto.producer_name = "qsearch"
    proto.doc_string = "LSQ fake-quant model exported by qsearch (QDQ, opset 21)"
    meta = {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION,
            "input_shape": list(input_shape),
            "precision": {r.name: {"w_bits": r.w_bits, "a_bits": r.a_bits, "weight": r.weight,
                                   "weight_dtype": r.weight_dtype,
                                   "activation_dtype": r.activation_dtype}
                          for r in exp.layers},
            "folded_bn": exp.folded_bn, "act_types": act_types, **(metadata or {})}
    _set_metadata(proto, meta)
    if check:
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:  # a bug here, not a user error: keep the checker's message
            raise RuntimeError(f"exported ONNX model fails onnx.checker: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    exp.path, exp.input_shape, exp.metadata = path, tuple(input_shape), meta
    return exp


def export_summary(exp: OnnxExport) -> dict[str, Any]:
    """JSON-able summary of an export (per-layer records, folded/kept BN)."""
    return {"path": str(exp.path), "layers": [asdict(r) for r in exp.layers],
            "folded_bn": exp.folded_bn, "kept_bn": exp.kept_bn,
            "input_shape": list(exp.input_shape)}


def packed_bytes(numel: int, onnx_type: str) -> int:
    """Bytes ``numel`` values of an ONNX type take when packed."""
    bits = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "FLOAT": 32, "INT64": 64,
            "FLOAT16": 16, "INT32": 32, "BOOL": 8, "DOUBLE": 64}.get(onnx_type, 32)
    return math.ceil(numel * bits / 8)
