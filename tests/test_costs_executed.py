"""Executed training cost (METHODS.md §7): the trainer's FLOP meter against PyTorch's own
``FlopCounterMode`` on real training steps of every method, the exact dW share LTS channel
freezing removes, and the measured-time and objective plumbing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qsearch.cost import count_macs
from qsearch.quant import flops as flops_mod
from qsearch.train import Trainer, train
from qsearch.train import costs as costs_mod
from qsearch.train.costs import fp32_backward_flops_per_sample

_FAST_DATA = {"val_fraction": 0.2}


class _Audit:
    """Wraps every ``Trainer._step`` in FlopCounterMode; the backward (``Tensor.backward``
    inside the step) gets a counter of its own, so forward and backward are told apart."""

    def __init__(self, monkeypatch):
        self.total = 0
        self.backward = 0
        orig_step = Trainer._step
        orig_backward = torch.Tensor.backward
        audit = self

        self.in_step = False

        def backward(t, *a, **k):
            if not audit.in_step:  # e.g. the FP32 warm start, which is not a trial step
                return orig_backward(t, *a, **k)
            with FlopCounterMode(display=False) as fc:
                out = orig_backward(t, *a, **k)
            audit.backward += fc.get_total_flops()
            return out

        def step(self_, *a, **k):
            audit.in_step = True
            try:
                with FlopCounterMode(display=False) as fc:
                    out = orig_step(self_, *a, **k)
            finally:
                audit.in_step = False
            audit.total += fc.get_total_flops()
            return out

        # FlopCounterMode is a dispatch mode, which torch.compile'd kernels refuse to trace.
        monkeypatch.setenv("QSEARCH_NO_COMPILE", "1")
        monkeypatch.setattr(Trainer, "_step", step)
        monkeypatch.setattr(torch.Tensor, "backward", backward)

    @property
    def forward(self) -> int:
        return self.total - self.backward


def _run(cfg, monkeypatch):
    audit = _Audit(monkeypatch)
    trainer = Trainer(cfg)
    result = trainer.run()
    return trainer, result, audit


def _model_macs(trainer) -> int:
    return sum(trainer.macs.values())


CASES = {
    "plain": {},
    "lts": {"methods": {"lts": {"enabled": True, "warmup_frac": 0.0, "mode": "fixing",
                                "rate": 0.3}}},
    "lts-channel": {"methods": {"lts": {"enabled": True, "warmup_frac": 0.0, "mode": "fixing",
                                        "rate": 0.25, "granularity": "channel"}}},
    "tr": {"methods": {"tr": {"enabled": True}}},
    "gradq": {"methods": {"gradq": {"enabled": True, "bits": 4,
                                    "granularity": "sample/channel"}}},
    "gradq-hypernet": {"methods": {"gradq": {"enabled": True, "bits": 4,
                                             "hypernet": {"enabled": True}}}},
    "blockrep": {"methods": {"blockrep": {"enabled": True}}},
    "csq": {"epochs": 2, "methods": {"csq": {"enabled": True, "target_bits": 3}}},
    "lts+tr+gradq": {"methods": {
        "lts": {"enabled": True, "warmup_frac": 0.0, "mode": "fixing", "rate": 0.25,
                "granularity": "channel"},
        "tr": {"enabled": True},
        "gradq": {"enabled": True, "bits": 4}}},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_counted_flops_match_flop_counter_on_real_training(case, tiny_config, monkeypatch):
    """Every step of a real (short) trial, stages included, audited by FlopCounterMode: the
    meter's backward GEMMs and its forwards agree within 2%, and ``backward_flops`` is the
    audited backward plus the audited extra forwards over the dense FP32 backward."""
    over = {"epochs": 1, "w_bits": 4, "a_bits": 4, "batch_size": 128, "data": _FAST_DATA,
            **CASES[case]}
    trainer, result, audit = _run(tiny_config(**over), monkeypatch)
    f = trainer.costs.flops
    assert f.samples > 0 and audit.backward > 0
    print(f"{case}: dW skipped {f.dw_skipped / max(1.0, f.dw_dense):.3f} of the quantized dW")
    lts = CASES[case].get("methods", {}).get("lts", {})
    if lts.get("granularity") == "channel":  # enough skipped that a dense count would show
        assert f.dw_skipped > 0.1 * f.dw_dense
    assert f.backward == pytest.approx(audit.backward, rel=0.02)
    assert f.forward + f.extra_forward == pytest.approx(audit.forward, rel=0.02)
    # The trained model's forward is exactly its MACs (CSQ's stage adds the GEMM that builds
    # each bit-plane weight); the rest FlopCounterMode saw is extra.
    if case == "csq":
        assert f.forward > 2 * _model_macs(trainer) * f.samples
    else:
        assert f.forward == pytest.approx(2 * _model_macs(trainer) * f.samples, rel=1e-9)
    extra = audit.forward - f.forward
    assert f.extra_forward == pytest.approx(extra, rel=0.02, abs=1e-6 * audit.forward)
    if case in ("blockrep", "gradq-hypernet"):  # teacher + FP suffixes; the hypernetwork
        assert f.extra_forward > 0
    ref = fp32_backward_flops_per_sample(trainer.macs) * f.samples
    expected = (audit.backward + extra) / ref
    assert result.metrics["backward_flops"] == pytest.approx(expected, rel=0.02)
    assert result.metrics["backward_time"] > 0
    assert result.metrics["backward_time_ratio"] > 0
    assert result.metrics["backward_bops"] == result.metrics["backward_cost"]
    if case == "csq":  # stage 1 is in the count: more samples than the QAT epoch alone
        assert f.samples == 2 * len(trainer.data.train)


def test_fp32_reference_step_is_one_backward_flops(tiny_config, monkeypatch):
    """A trial without quantization runs exactly the dense FP32 backward: 1.0."""
    cfg = tiny_config(epochs=1, w_bits=32, a_bits=32, first_bits=None, last_bits=None,
                      data=_FAST_DATA)
    _, result, audit = _run(cfg, monkeypatch)
    assert result.metrics["backward_flops"] == pytest.approx(1.0, rel=1e-9)


def test_lsq_first_layer_input_gradient_is_executed(tiny_config, monkeypatch):
    """Plain W4A4 QAT: the first layer's dX runs (its LSQ activation step needs it), which the
    FP32 reference does not; backward_flops is above 1 by exactly that layer's share, while
    the modelled backward_bops says 4/32-ish."""
    cfg = tiny_config(epochs=1, w_bits=4, a_bits=4, data=_FAST_DATA)
    trainer, result, _ = _run(cfg, monkeypatch)
    first = next(iter(trainer.macs.values()))
    ref = fp32_backward_flops_per_sample(trainer.macs)
    assert result.metrics["backward_flops"] == pytest.approx((ref + 2 * first) / ref, rel=1e-9)
    assert result.metrics["backward_bops"] < 0.3


def _lts_trainer(tiny_config, **lts):
    cfg = tiny_config(epochs=1, w_bits=4, a_bits=4, batch_size=64, data=_FAST_DATA,
                      methods={"lts": {"enabled": True, "granularity": "channel",
                                       "warmup_frac": 0.9, **lts}})
    trainer = Trainer(cfg)
    ctx = trainer.setup(None)
    return trainer, ctx


def test_channel_freezing_removes_exactly_those_channels_dw(tiny_config, monkeypatch):
    """A known set of frozen output channels: the executed dW drops by exactly their share of
    each layer's dW (FlopCounterMode sees the same), and flops_saved_executed is that drop
    over the dense backward."""
    from qsearch.methods.lts import _apply_layout

    trainer, ctx = _lts_trainer(tiny_config)
    lts = trainer.methods[0]
    x, y = next(iter(ctx.batches(0)))
    b = len(y)
    trainer.train_step(ctx, x, y)  # initialise activation steps
    base = trainer.costs.flops.copy()
    trainer.train_step(ctx, x, y)
    dense_dw = trainer.costs.flops.dw - base.dw
    frozen = {"stage2.0.0": [0, 5, 7, 63], "stage3.0": list(range(0, 64, 2))}
    expect_skip = 0.0
    macs = count_macs(ctx.model, ctx.input_shape)
    for name, chans in frozen.items():
        q = ctx.qlayers[name]
        q.lts_frozen[chans] = True
        lts._any_frozen[name] = _apply_layout(q)
        expect_skip += 2 * macs[name] * b * len(chans) / q.weight.shape[0]
    lts.before_forward = lambda ctx: None  # keep exactly this layout for the next step
    before = trainer.costs.flops.copy()
    with FlopCounterMode(display=False) as fc_frozen:
        trainer.train_step(ctx, x, y)
    after = trainer.costs.flops
    assert after.dw - before.dw == pytest.approx(dense_dw - expect_skip, rel=1e-12)
    assert after.dw_skipped - before.dw_skipped == pytest.approx(expect_skip, rel=1e-12)
    # FlopCounterMode: the frozen step costs exactly the skipped dW less than a dense step
    for q in ctx.qlayers.values():
        q.backward.dw_channels = None
    with FlopCounterMode(display=False) as fc_dense:
        trainer.train_step(ctx, x, y)
    assert fc_dense.get_total_flops() - fc_frozen.get_total_flops() == pytest.approx(
        expect_skip, rel=1e-9)
    # the executed saving LTS reports is the skipped dW over the dense dX + dW of its steps
    total_skip = trainer.costs.flops.dw_skipped
    samples = trainer.costs.flops.samples
    assert lts.flops_saved_executed(ctx) == pytest.approx(
        total_skip / (4 * sum(macs.values()) * samples), rel=1e-12)


def test_channel_granularity_freezes_whole_channels_so_counted_equals_executed(
        tiny_config, monkeypatch):
    """granularity=channel: every frozen element is in a whole frozen channel, so the executed
    saving equals the counted one; granularity=element on the same run executes less."""
    res = {}
    for gran in ("element", "channel"):
        cfg = tiny_config(epochs=2, w_bits=2, a_bits=2, batch_size=64, data=_FAST_DATA,
                          methods={"lts": {"enabled": True, "granularity": gran,
                                           "warmup_frac": 0.2}})
        res[gran] = train(cfg).metrics
    ch, el = res["channel"], res["element"]
    assert ch["lts.flops_saved_counted"] > 0.02
    assert ch["lts.flops_saved_executed"] == pytest.approx(ch["lts.flops_saved_counted"],
                                                           rel=0.05, abs=1e-3)
    assert el["lts.flops_saved_executed"] < 0.5 * el["lts.flops_saved_counted"]
    assert ch["backward_flops"] < el["backward_flops"] or \
        ch["lts.flops_saved_executed"] > el["lts.flops_saved_executed"]


def test_freeze_channels_rule():
    from qsearch.methods.lts import freeze_channels

    dist = torch.tensor([[0.1, 0.1, 0.1], [0.1, 0.1, 0.9], [0.5, 0.5, 0.5]])
    mask = torch.zeros_like(dist, dtype=torch.bool)
    assert freeze_channels(mask, dist, 0.4, "mean") == 6  # rows 0 (0.1) and 1 (0.367)
    assert mask.tolist() == [[True] * 3, [True] * 3, [False] * 3]
    mask = torch.zeros_like(dist, dtype=torch.bool)
    assert freeze_channels(mask, dist, 0.4, "max") == 3
    assert freeze_channels(mask, dist, None, "max") == 0
    assert freeze_channels(mask, dist, 0.4, "max") == 0  # nothing new; nothing unfreezes


def test_meter_counts_nothing_when_inactive_and_eval_adds_no_backward():
    from qsearch.models import build_model
    from qsearch.quant import Precision, convert

    model = build_model("tiny-cnn", 10, 1)
    convert(model, Precision(w_bits=4, a_bits=4))
    totals = flops_mod.FlopTotals()
    model(torch.randn(4, 1, 8, 8)).sum().backward()  # no meter: nothing recorded anywhere
    assert flops_mod.current() is None
    with flops_mod.FlopMeter(totals, model), torch.no_grad():
        model.eval()
        model(torch.randn(4, 1, 8, 8))
    macs = sum(count_macs(model, (1, 8, 8)).values())
    assert totals.forward == 2 * macs * 4
    assert totals.backward == 0 and totals.dw_dense == 0


def test_fp32_reference_is_cached_and_leaves_the_rng_alone(monkeypatch):
    monkeypatch.setattr(costs_mod, "_FP32_REFERENCE", {})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    dev = torch.device("cpu")
    a = costs_mod.fp32_reference_backward_s("tiny-cnn", 10, 1, (1, 8, 8), 16, dev, reps=2)
    assert torch.equal(torch.get_rng_state(), before)
    calls = []
    monkeypatch.setattr(costs_mod.TrainingCosts, "timed",
                        lambda self: calls.append(1) or pytest.fail("measured twice"))
    b = costs_mod.fp32_reference_backward_s("tiny-cnn", 10, 1, (1, 8, 8), 16, dev, reps=2)
    assert a == b > 0 and not calls


def test_gradq_kernel_is_simulated_on_cpu(tiny_config):
    from qsearch.methods.gradq import choose_kernel

    assert choose_kernel(torch.device("cpu"), 4) == "simulated"
    assert choose_kernel(torch.device("cpu"), 8) == "simulated"
    cfg = tiny_config(epochs=1, data=_FAST_DATA, methods={"gradq": {"enabled": True, "bits": 4}})
    assert train(cfg).metrics["gradq.kernel"] == "simulated"


def test_objectives_registered_and_backward_cost_is_a_deprecated_alias():
    from qsearch.config import objectives as reg
    from qsearch.config.study import parse_study_spec

    kinds = {n: reg.get_objective(n).kind for n in ("backward_flops", "backward_time",
                                                    "backward_bops")}
    assert kinds == {"backward_flops": "executed", "backward_time": "measured",
                     "backward_bops": "modelled"}
    assert "not executed here" in reg.get_objective("backward_bops").label
    assert reg.get_objective("backward_cost").name == "backward_bops"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        spec = parse_study_spec({"name": "x", "objectives": ["val_accuracy", "backward_cost"],
                                 "search_space": {"w_bits": {"type": "categorical",
                                                             "choices": [2, 4]}}})
    assert [reg.resolve_name(o) for o in spec.objectives] == ["val_accuracy", "backward_bops"]
    assert any("backward_cost" in str(x.message) and "backward_bops" in str(x.message)
               for x in w)


@pytest.mark.parametrize("gran", ["tensor", "sample/channel"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_int8_gemm_arithmetic_is_exact_with_an_integer_matmul(kind, gran, monkeypatch):
    """The INT8 backward (CUDA only) checked on CPU: ``torch._int_mm`` replaced by an exact
    integer matmul, deterministic gradient levels; dX/dW/db equal the FP32 GEMMs of the same
    quantized operands, including an unsigned 8-bit activation (offset path), an asymmetric
    8-bit gradient grid and a subset of dW channels."""
    import torch.nn.functional as F

    from qsearch.methods.gradq import _minmax, sr_grid
    from qsearch.quant import QConv2d, QLinear
    from qsearch.quant import int8_gemm

    monkeypatch.setattr(int8_gemm, "_int_mm",
                        lambda a, b: (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32))

    def levels(g, keep, bits=8):
        lo, hi = _minmax(g, keep)
        scale, qmin, qmax = sr_grid(lo, hi, bits)
        return (g / scale).round().clamp(qmin, qmax), scale, qmin, qmax

    torch.manual_seed(0)
    if kind == "conv":
        layer = QConv2d.from_float(torch.nn.Conv2d(6, 8, 3, padding=1, stride=2), 4, 8,
                                   a_signed=False)
        x = torch.rand(3, 6, 9, 9)
    else:
        layer = QLinear.from_float(torch.nn.Linear(24, 16), 4, 8, a_signed=False)
        x = torch.rand(20, 24)
    layer.train()
    xq = layer.a_quant(x).detach()
    wq = layer.quantized_weight().detach()
    cdim = 1 if kind == "conv" else -1
    op = int8_gemm.Int8GradGemm(layer, 8, gran, levels, cdim)
    if kind == "conv":
        gy = torch.randn(3, 8, 5, 5)
    else:
        gy = torch.randn(20, 16)
    ch = torch.tensor([1, 2, 5])
    k_dx = None if gran == "tensor" else 0
    k_dw = None if gran == "tensor" else cdim
    lv, sc, *_ = levels(gy, k_dx)
    g_dx = lv * sc
    lv, sc, *_ = levels(gy, k_dw)
    g_dw = lv * sc
    if kind == "conv":
        gx, gw, gb = op.conv(xq, wq, gy, layer.stride, layer.padding, layer.dilation,
                             True, True, True, ch)
        ref_gx = torch.nn.grad.conv2d_input(x.shape, wq, g_dx, layer.stride, layer.padding)
        ref_gw = torch.nn.grad.conv2d_weight(xq, wq.shape, g_dw, layer.stride, layer.padding)
        ref_gb = g_dw.sum(dim=(0, 2, 3))
    else:
        gx, gw, gb = op.linear(xq, wq, gy, True, True, True, ch)
        ref_gx, ref_gw, ref_gb = g_dx @ wq, g_dw.t() @ xq, g_dw.sum(0)
    mask = torch.zeros(wq.shape[0], dtype=torch.bool)
    mask[ch] = True
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw[mask], ref_gw[mask], rtol=1e-5, atol=1e-5)
    assert torch.all(gw[~mask] == 0)
    torch.testing.assert_close(gb, ref_gb, rtol=1e-5, atol=1e-5)
    assert not op.usable(xq)  # CPU tensors never take this path
    _ = F  # noqa: F841
