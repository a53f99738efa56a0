"""Run an exported ONNX model with ONNX Runtime (CPU) and compare it with PyTorch.

:func:`evaluate_onnx` needs only the file: the ``qsearch.*`` metadata says which dataset (and
options) to score on and what accuracy the study stored. :func:`compare_with_torch` runs the
ONNX model and the PyTorch fake-quant model on the same test split and reports top-1
agreement and the largest logit difference.

Why the two can differ at all: LSQ multiplies by ``1/s`` before rounding while
QuantizeLinear divides by ``s``, and the two runtimes accumulate convolutions in different
orders. A value within float rounding of a ``.5`` tie can then round to the neighbouring level:
one activation one quantization step off, which moves the logits by about that step times the
downstream weights. That is rare and small; anything else is a bug.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qsearch.deploy.onnx_export import META_PREFIX, ONNX_FORMAT
from qsearch.errors import ConfigError


def load_onnx(path: str | Path) -> Any:
    """The ModelProto at ``path``; ConfigError when it is missing or not an ONNX model."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "ONNX file not found")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        raise ConfigError(str(path), f"not an ONNX model ({type(e).__name__})") from None
    if model.ir_version <= 0 or not model.graph.node or not model.graph.input:
        raise ConfigError(str(path), "not an ONNX model (no graph)")
    return model


def onnx_metadata(model: Any) -> dict[str, Any]:
    """The ``qsearch.*`` metadata_props of a model, JSON-decoded, without the prefix."""
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except ValueError:
                out[p.key[len(META_PREFIX):]] = p.value
    return out


def _has_4bit_activation_qdq(model: Any) -> bool:
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2
               and inits.get(n.input[2]) in (21, 22) for n in model.graph.node)


def make_session(model_or_path: Any) -> Any:
    """An ORT CPU session. Graph optimisation stays at ORT's default (all) unless the model
    quantizes activations to 4-bit types, which ORT 1.32 runs only at BASIC (see
    ``export_onnx(act_types=...)``)."""
    import onnxruntime as ort

    model = model_or_path if hasattr(model_or_path, "SerializeToString") \
        else load_onnx(model_or_path)
    src = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if _has_4bit_activation_qdq(model):
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        name = str(model_or_path) if isinstance(model_or_path, (str, Path)) else "model"
        raise ConfigError(name, f"ONNX Runtime cannot load it: {str(e).splitlines()[0][:300]}") \
            from None


def _input_dims(sess: Any) -> tuple[str, list[Any]]:
    inp = sess.get_inputs()[0]
    return inp.name, list(inp.shape)


def check_input_fits(sess: Any, input_shape: tuple[int, ...], where: str, dataset: str) -> None:
    """ConfigError unless the model's (static) C, H, W equal the dataset's."""
    _, dims = _input_dims(sess)
    want = list(input_shape)
    if len(dims) != len(want) + 1 or any(isinstance(d, int) and d != w
                                         for d, w in zip(dims[1:], want, strict=True)):
        shown = "x".join(str(d) for d in dims)
        raise ConfigError(where, f"model input {shown} does not fit dataset {dataset!r} "
                          f"(batch x {'x'.join(map(str, want))})")


def run_onnx(sess: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of ``x`` (N, C, H, W float32), in batches (padded when the batch is static)."""
    name, dims = _input_dims(sess)
    static = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    bs = static or batch_size
    out = []
    for i in range(0, len(x), bs):
        xb = np.ascontiguousarray(x[i:i + bs], dtype=np.float32)
        n = len(xb)
        if static and n < static:
            xb = np.concatenate([xb, np.zeros((static - n, *xb.shape[1:]), np.float32)])
        out.append(sess.run(None, {name: xb})[0][:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def split_arrays(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a DatasetBundle's test split as numpy arrays."""
    from qsearch.data.registry import iterate_batches

    xs, ys = [], []
    for xb, yb in iterate_batches(data, "test", 512, shuffle=False):
        xs.append(xb.numpy())
        ys.append(yb.numpy())
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _dataset_from_metadata(meta: dict[str, Any], where: str, dataset: str | None) -> Any:
    from qsearch.config import DataConfig
    from qsearch.data import load_dataset

    name = dataset or meta.get("dataset")
    if not name:
        raise ConfigError(where, "the ONNX model carries no qsearch dataset metadata; "
                          "pass --dataset")
    opts = meta.get("data") if name == meta.get("dataset") else None
    try:
        data_cfg = DataConfig(**(opts or {}))
    except Exception as e:
        raise ConfigError(f"{where}: data", f"invalid dataset options: {e}") from None
    return name, load_dataset(name, data_cfg)


def evaluate_onnx(path: str | Path, *, dataset: str | None = None,
                  batch_size: int = 256) -> dict[str, Any]:
    """Accuracy of the ONNX model at ``path`` on its dataset's test split (ORT, CPU)."""
    model = load_onnx(path)
    meta = onnx_metadata(model)
    if meta.get("format") not in (None, ONNX_FORMAT):
        raise ConfigError(str(path), f"unknown qsearch ONNX format {meta.get('format')!r}")
    name, data = _dataset_from_metadata(meta, str(path), dataset)
    sess = make_session(model)
    check_input_fits(sess, data.input_shape, str(path), name)
    x, y = split_arrays(data)
    logits = run_onnx(sess, x, batch_size)
    acc = float((logits.argmax(1) == y).mean()) if len(y) else float("nan")
    stored = meta.get("stored_accuracy")
    stored_test = meta.get("stored_test_accuracy")
    # The study's ``accuracy`` objective is on the validation split where the config has one
    # (data.val_fraction); then only a stored test accuracy compares with this number.
    has_val = "val_fraction" in (meta.get("data") or {})
    ref = stored_test if stored_test is not None else (None if has_val else stored)
    return {"file": str(path), "dataset": name, "n": int(len(y)), "accuracy": acc,
            "stored_accuracy": stored, "stored_test_accuracy": stored_test,
            "reference_accuracy": ref, "study": meta.get("study"), "trial": meta.get("trial"),
            "input_shape": meta.get("input_shape", list(data.input_shape)),
            "difference": None if ref is None else acc - float(ref)}


def compare_with_torch(onnx_model: Any, torch_model: Any, data: Any,
                       batch_size: int = 256) -> dict[str, Any]:
    """Top-1 agreement and max |logit difference| of ORT vs the PyTorch model on the test
    split of ``data``; also both accuracies."""
    import torch

    sess = make_session(onnx_model)
    check_input_fits(sess, data.input_shape, "model", "dataset")
    x, y = split_arrays(data)
    logits_ort = run_onnx(sess, x, batch_size)
    torch_model = torch_model.eval()
    with torch.no_grad():
        logits_pt = np.concatenate([torch_model(torch.from_numpy(x[i:i + batch_size])).numpy()
                                    for i in range(0, len(x), batch_size)])
    diff = np.abs(logits_ort - logits_pt)
    p_ort, p_pt = logits_ort.argmax(1), logits_pt.argmax(1)
    return {"n": int(len(y)), "agreement": float((p_ort == p_pt).mean()),
            "max_logit_diff": float(diff.max()), "mean_logit_diff": float(diff.mean()),
            "logit_range": float(np.abs(logits_pt).max()),
            "onnx_accuracy": float((p_ort == y).mean()),
            "torch_accuracy": float((p_pt == y).mean())}


__all__ = ["check_input_fits", "compare_with_torch", "evaluate_onnx",
           "load_onnx", "make_session", "onnx_metadata", "run_onnx", "split_arrays"]
