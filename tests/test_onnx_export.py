"""ONNX QDQ export: checker-valid, runs in ONNX Runtime CPU with the PyTorch fake-quant model's
predictions, stores weights at their bit width, and reports its true size."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from qsearch.cli import main  # noqa: E402
from qsearch.config import parse_trial_config  # noqa: E402
from qsearch.deploy import (  # noqa: E402
    build_encodings,
    compare_with_torch,
    evaluate_onnx,
    export_onnx,
    size_report,
    write_encodings,
)

# Mixed 2/4/8-bit (+ FP32, + 3-bit activations) precision plans.
CONFIGS = {
    "tiny-cnn": {"layers": {"stage2.0.0": {"w_bits": 2, "a_bits": 2},
                            "stage3.0": {"w_bits": 4, "a_bits": 4}}},
    "resnet20": {"w_bits": 4, "a_bits": 4,
                 "layers": {"re:layer1\\..*": {"w_bits": 2, "a_bits": 3},
                            "re:layer3\\..*": {"w_bits": 8, "a_bits": 8},
                            "layer2.2.conv2": {"w_bits": 32},  # FP32 weights: BN folds
                            "layer3.2.conv1": {"a_bits": 32}}},  # float input: no Q/DQ
}


@pytest.fixture(scope="module", autouse=True)
def _eager_quantizers():
    """Eager LSQ kernels and one thread here: compiling the fused kernels costs minutes on a
    small CPU and the export does not depend on them (they are bit-exact to the eager
    forward); these models are too small to gain from threads, which only spin on a busy box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSEARCH_NO_COMPILE", "1")
        yield
    torch.set_num_threads(threads)


def _train(model: str, tmp_path_factory) -> object:
    from qsearch.train import train

    cache = tmp_path_factory.mktemp("warm")
    cfg = parse_trial_config({"model": model, "dataset": "digits", "epochs": 1, "device": "cpu",
                              "batch_size": 64, "num_threads": 1,
                              "warm_start": {"epochs": 1, "cache_dir": str(cache)},
                              **CONFIGS[model]})
    return train(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _eager_quantizers):
    """Trial results (1 QAT epoch after a 1-epoch warm start: a few seconds each)."""
    return {m: _train(m, tmp_path_factory) for m in CONFIGS}


@pytest.fixture(scope="module")
def digits():
    from qsearch.config import DataConfig
    from qsearch.data import load_dataset

    return load_dataset("digits", DataConfig())


def _init_types(model) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def _q_types(model) -> dict[str, int]:
    """Zero-point type of each activation QuantizeLinear, by layer."""
    inits = _init_types(model)
    return {n.name.split("/")[0]: inits[n.input[2]] for n in model.graph.node
            if n.op_type == "QuantizeLinear"}


def _check_parity(res: dict, logits_scale: float) -> None:
    # Tolerance: ORT's QuantizeLinear divides by the step where LSQ multiplies by 1/step, and
    # the runtimes sum convolutions in different orders, so an activation within float rounding
    # of a .5 tie may land one quantization step away. One such step moves the logits by about
    # step * |downstream weights|: measured <= 0.03 on logits of magnitude ~16 (0.2%). 2% of
    # the logit range allows a few such flips; a wrong scale, zero point or BN is far above.
    assert res["agreement"] >= 0.99, res
    assert res["max_logit_diff"] <= 0.02 * logits_scale, res
    assert res["mean_logit_diff"] <= 1e-3 * logits_scale, res


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_matches_pytorch_and_stores_weights_at_their_width(trained, digits, tmp_path, name):
    r = trained[name]
    model = r.model.eval()
    path = tmp_path / f"{name}.onnx"
    exp = export_onnx(model, digits.input_shape, path, metadata={"dataset": "digits"})
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == 21
    res = compare_with_torch(m, model, digits)
    print(f"{name}: agreement {res['agreement']:.4f}, max logit diff {res['max_logit_diff']:.3g}"
          f" (logits up to {res['logit_range']:.3g}), ORT acc {res['onnx_accuracy']:.4f}, "
          f"torch acc {res['torch_accuracy']:.4f}")
    _check_parity(res, res["logit_range"])
    # The trainer scores the final weights on the test split (test_accuracy) since validation
    # splits exist; before, its ``accuracy`` was the test accuracy.
    ref = r.metrics.get("test_accuracy", r.metrics["accuracy"])
    assert res["torch_accuracy"] == pytest.approx(ref, abs=1e-12)

    types, qtypes = _init_types(m), _q_types(m)
    by_name = {x.name: x for x in exp.layers}
    for layer, bits in r.weight_bits.items():
        t = types[f"{layer}.weight"]
        want = TensorProto.FLOAT if bits == 32 else \
            TensorProto.INT4 if bits <= 4 else TensorProto.INT8
        assert t == want, (layer, bits, t)
        a = by_name[layer].a_bits
        if a == 32:
            assert layer not in qtypes
        else:  # default act_types="int8": every activation Q/DQ is 8-bit, signed only first
            first = layer == next(iter(r.weight_bits))
            assert qtypes[layer] == (TensorProto.INT8 if first else TensorProto.UINT8)
            assert by_name[layer].clipped == (a != 8)
    # The INT4 initializers really are packed: two weights a byte.
    for init in m.graph.initializer:
        if init.data_type == TensorProto.INT4:
            assert len(init.raw_data) == math.ceil(np.prod(init.dims) / 2)
    ops = [n.op_type for n in m.graph.node]
    n_fp32_convs = sum(1 for b in r.weight_bits.values() if b == 32)
    # BN after every quantized conv stays; after an FP32 conv it is folded away.
    assert ops.count("BatchNormalization") == ops.count("Conv") - n_fp32_convs
    assert set(exp.folded_bn) == {n for n, b in r.weight_bits.items() if b == 32}


def test_4bit_activation_types_run_in_ort(trained, digits, tmp_path):
    r = trained["tiny-cnn"]
    path = tmp_path / "a4.onnx"
    export_onnx(r.model, digits.input_shape, path, act_types="int4")
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    q = _q_types(m)
    assert q == {"stage1.0": TensorProto.INT8, "stage2.0.0": TensorProto.UINT4,
                 "stage3.0": TensorProto.UINT4, "fc": TensorProto.UINT8}
    res = compare_with_torch(m, r.model, digits)
    _check_parity(res, res["logit_range"])


def test_encodings_sidecar_has_true_bit_widths_and_steps(trained, digits, tmp_path):
    from qsearch.quant import quant_layers

    r = trained["resnet20"]
    exp = export_onnx(r.model, digits.input_shape, tmp_path / "r.onnx")
    path = write_encodings(exp)
    assert path.name == "r.encodings.json"
    enc = json.loads(path.read_text())
    assert enc == json.loads(json.dumps(build_encodings(exp)))
    assert enc["version"] == "0.6.1"
    layers = quant_layers(r.model)
    for name, q in layers.items():
        p = enc["param_encodings"].get(f"{name}.weight")
        if q.w_bits == 32:
            assert p is None
            continue
        (e,) = p
        assert e["bitwidth"] == q.w_bits and e["offset"] == -(2 ** (q.w_bits - 1))
        assert e["scale"] == pytest.approx(float(q.w_quant.step.detach()))
        assert e["is_symmetric"] == "True" and e["dtype"] == "int"
    acts = enc["activation_encodings"]
    assert len(acts) == sum(1 for q in layers.values() if q.a_bits < 32)
    (first,) = acts["input"]  # the graph input: signed 8-bit
    assert first["bitwidth"] == 8 and first["offset"] == -128
    bits = sorted({e[0]["bitwidth"] for e in acts.values()})
    assert bits == [3, 4, 8]
    assert all(e[0]["offset"] == 0 for k, e in acts.items() if k != "input")  # post-ReLU
    assert enc["qsearch"]["layers"]["layer1.0.conv1"]["weight_dtype"] == "INT4"  # 2 bits


@pytest.mark.slow
def test_4bit_resnet20_file_is_a_fifth_of_fp32_and_size_is_explained(tmp_path):
    import torch

    from qsearch.cost import compute_cost, extra_param_count, layer_costs
    from qsearch.models import build_model
    from qsearch.quant import Precision, convert, quant_layers

    torch.manual_seed(0)
    fp = build_model("resnet20", 10, 3).eval()
    fp_path = export_onnx(fp, (3, 32, 32), tmp_path / "fp32.onnx").path
    q = build_model("resnet20", 10, 3)
    q.load_state_dict(fp.state_dict())
    convert(q, Precision(w_bits=4, a_bits=4))  # first/last layer 8-bit, the rest 4-bit
    q.eval()
    q_path = export_onnx(q, (3, 32, 32), tmp_path / "w4.onnx").path
    study_mb = compute_cost(layer_costs(q, (3, 32, 32)),
                            extra_param_count(q, quant_layers(q))).size_mb
    rep, fp_rep = size_report(q_path, study_size_mb=study_mb), size_report(fp_path)
    ratio = rep["file_bytes"] / fp_rep["file_bytes"]
    print(f"resnet20 4-bit ONNX {rep['file_bytes']} B vs FP32 ONNX {fp_rep['file_bytes']} B "
          f"(x{ratio:.3f}); weights {rep['weights_bytes_by_dtype']}, "
          f"by role {rep['bytes_by_role']}, study {study_mb} MB, {rep['explained']}")
    assert ratio <= 0.2
    # Packed sizes: every 4-bit weight is half a byte, the 8-bit first/last layers a byte.
    layers = quant_layers(q)
    n4 = sum(m.weight.numel() for m in layers.values() if m.w_bits == 4)
    n8 = sum(m.weight.numel() for m in layers.values() if m.w_bits == 8)
    assert rep["weights_bytes_by_dtype"] == {"int4": math.ceil(n4 / 2), "int8": n8}
    assert fp_rep["weights_bytes_by_dtype"] == {"float32": 4 * (n4 + n8)}
    # The items account for the whole difference to the study's size_mb.
    assert abs(rep["residual_bytes"]) < 1e-6 * rep["file_bytes"]
    assert rep["explained"]["storage_padding"] == 0  # 4/8-bit grids fill their storage


def test_metadata_lets_eval_run_from_the_file_alone(trained, digits, tmp_path, capsys):
    r = trained["tiny-cnn"]
    path = tmp_path / "t.onnx"
    test_acc = r.metrics.get("test_accuracy", r.metrics["accuracy"])
    export_onnx(r.model, digits.input_shape, path,
                metadata={"study": "s", "trial": 3, "stored_accuracy": r.metrics["accuracy"],
                          "stored_test_accuracy": test_acc, "dataset": "digits", "data": {}})
    res = evaluate_onnx(path)
    assert res["n"] == len(digits.test) and res["study"] == "s" and res["trial"] == 3
    assert res["reference_accuracy"] == test_acc
    assert abs(res["difference"]) <= 2 / res["n"]  # ORT flips at most a prediction or two
    assert main(["eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "stored" in out and "digits" in out
    assert main(["eval", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["accuracy"]
    # The model's 1x8x8 input does not fit the synthetic dataset's 3x32x32 images.
    assert main(["eval", str(path), "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # a fresh interpreter importing torch: ~20 s on a busy 2-core box
def test_cli_eval_of_a_file_that_is_not_onnx_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "notonnx.onnx"
    bad.write_text("this is not a protobuf\n" * 20)
    p = subprocess.run([sys.executable, "-m", "qsearch", "eval", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not an ONNX model" in lines[0]
    assert main(["eval", str(tmp_path / "missing.onnx")]) == 2


@pytest.mark.slow
def test_cli_exports_a_study_trial_and_the_whole_front(tmp_path_factory, ray_session, capsys):
    from _search_helpers import tiny_spec

    from qsearch.config import parse_study_spec
    from qsearch.search import launch
    from qsearch.store import Store, queries

    tmp = tmp_path_factory.mktemp("onnxstudy")
    url = f"sqlite:///{tmp / 'q.db'}"
    spec = parse_study_spec(tiny_spec("ox", url, tmp, budget={"num_trials": 3, "max_concurrent": 1},
                                      base={"epochs": 1, "device": "cpu", "batch_size": 128,
                                            "warm_start": {"epochs": 1}},
                                      sampler={"type": "random", "seed": 3},
                                      artifacts={"dir": str(tmp / "art"), "keep": "all"}))
    assert launch(spec, display=False).complete == 3
    out = tmp / "model.onnx"
    assert main(["export", "ox", "--storage", url, "--pick", "max-accuracy", "--format", "onnx",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weights packed" in printed and "study size_mb" in printed
    for f in ("model.onnx", "model.encodings.json", "model.json", "model.pt"):
        assert (tmp / f).is_file(), f
    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["study"] == "ox" and res["dataset"] == "digits"
    # The stored (test) accuracy is the PyTorch model's; ORT agrees to within a prediction or
    # two (no reference when the study stored only a validation accuracy).
    if res["reference_accuracy"] is not None:
        assert abs(res["difference"]) <= 2 / res["n"]
    front_dir = tmp / "front"
    assert main(["export", "ox", "--storage", url, "--all-front", "-o", str(front_dir)]) == 0
    index = json.loads((front_dir / "index.json").read_text())
    store = Store(url, create=False)
    try:
        _, front = queries.pareto_front(store, "ox")
    finally:
        store.dispose()
    assert [p["trial"] for p in index["points"]] == [p["trial_number"] for p in front]
    for p in index["points"]:
        for k in ("onnx", "encodings", "export", "weights"):
            assert (front_dir / p[k]).is_file()
        onnx.checker.check_model(onnx.load(str(front_dir / p["onnx"])), full_check=True)
    assert main(["export", "ox", "--storage", url, "--all-front", "--trial", "0",
                 "-o", str(front_dir)]) == 2
