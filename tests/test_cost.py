"""The cost model of METHODS.md §7, checked against numbers derived by hand from the
architectures and against PyTorch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qsearch.cost import LayerCost, compute_cost, count_macs, extra_param_count, layer_costs
from qsearch.models import build_model
from qsearch.quant import Precision, convert


def _resnet20_by_hand(w_bits: int, edge_bits: int, num_classes: int = 10) -> dict[str, float]:
    """ResNet-20 (option-A shortcuts, no parameters in the shortcut), counted from the paper's
    description: a 3->16 stem conv, three stages of three BasicBlocks (two 3x3 convs + two BN
    each) at widths 16/32/64, global pool and a 64->classes linear with bias."""
    convs_mid = []  # (cin, cout) of every 3x3 conv except the stem
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            convs_mid += [(cin, width), (width, width)]
            cin = width
    stem = 3 * 16 * 9
    mid = sum(ci * co * 9 for ci, co in convs_mid)
    fc_w = 64 * num_classes
    bn_channels = 16 + sum(co for _, co in convs_mid)  # one BN after every conv
    n_quant_layers = 1 + len(convs_mid) + 1
    fp32_extra = (
        4 * bn_channels          # BN weight, bias, running_mean, running_var
        + num_classes            # fc bias
        + 2 * n_quant_layers     # weight and activation step size of every quantized layer
    )
    bits = stem * edge_bits + mid * w_bits + fc_w * edge_bits + 32 * fp32_extra
    return {"size_mb": bits / 8 / 1e6, "weights": stem + mid + fc_w, "bn": bn_channels,
            "layers": n_quant_layers}


def test_resnet20_size_w4_first_last_8bit_by_hand():
    expected = _resnet20_by_hand(w_bits=4, edge_bits=8)
    model = build_model("resnet20", 10, 3)
    float_params = sum(p.numel() for p in model.parameters())
    # sanity of the hand count against the float model: weights + BN affine + fc bias (0.27M)
    assert float_params == expected["weights"] + 2 * expected["bn"] + 10
    qlayers = convert(model, Precision(w_bits=4, a_bits=4, first_bits=8, last_bits=8))
    assert len(qlayers) == expected["layers"]
    rows = layer_costs(model, (3, 32, 32))
    cost = compute_cost(rows, extra_param_count(model, qlayers))
    assert cost.size_mb == pytest.approx(expected["size_mb"], rel=1e-12)
    assert 0.12 < cost.size_mb < 0.15  # ~0.27M weights at ~4 bits


def test_fp32_size_is_four_bytes_per_parameter_and_running_stat():
    """At 32 bits every quantizer is off: size = 4 bytes x (parameters + BN running stats)."""
    model = build_model("resnet20", 10, 3)
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for k, b in model.named_buffers() if k.endswith(("running_mean", "running_var")))
    qlayers = convert(model, Precision(w_bits=32, a_bits=32, first_bits=None, last_bits=None))
    cost = compute_cost(layer_costs(model, (3, 32, 32)), extra_param_count(model, qlayers))
    assert cost.size_mb == pytest.approx(4 * n / 1e6, rel=1e-12)
    assert cost.backward_cost == pytest.approx(1.0)


def test_tiny_cnn_cost_by_hand():
    """Every §7 quantity for tiny-cnn (1x8x8 -> conv 32 -> conv 64 + pool -> conv 64 -> fc)."""
    model = build_model("tiny-cnn", 10, 1)
    qlayers = convert(model, Precision(w_bits=4, a_bits=4, first_bits=8, last_bits=8))
    rows = layer_costs(model, (1, 8, 8))
    cost = compute_cost(rows, extra_param_count(model, qlayers))
    # (MACs per sample, weights, w bits, a bits); conv MACs = out H*W*Cout * Cin*3*3
    layers = [
        (8 * 8 * 32 * 1 * 9, 32 * 1 * 9, 8, 8),
        (8 * 8 * 64 * 32 * 9, 64 * 32 * 9, 4, 4),  # pooling comes after this conv
        (4 * 4 * 64 * 64 * 9, 64 * 64 * 9, 4, 4),
        (64 * 10, 64 * 10, 8, 8),
    ]
    assert [(r.macs, r.params, r.w_bits, r.a_bits) for r in rows] == layers
    # FP32 extras counted from the state dict itself: every floating-point tensor except the
    # quantized weights (BN affine + running stats, fc bias, the 2 LSQ steps of each layer).
    quantized = {f"{n}.weight" for n in qlayers}
    fp32 = sum(t.numel() for k, t in model.state_dict().items()
               if t.is_floating_point() and k not in quantized)
    assert fp32 == 4 * (32 + 64 + 64) + 10 + 2 * 4 == extra_param_count(model, qlayers)
    # Worked out by hand: weights 288*8 + 18,432*4 + 36,864*4 + 640*8 = 228,608 bits, plus
    # 658 FP32 extras = 21,056 bits: 249,664 bits = 31,208 bytes.
    assert cost.size_mb == pytest.approx(0.031208, rel=1e-12)
    # 18,432*8*8 + 1,179,648*4*4 + 589,824*4*4 + 640*8*8
    assert cost.bops == 1_179_648 + 18_874_368 + 9_437_184 + 40_960 == 29_532_160
    # Backward bit-ops at FP32 gradients, worked out by hand (dX skipped for the first layer):
    #   stem dW 18432*32*8 = 4,718,592; conv2 dX+dW 2*1,179,648*32*4 = 301,989,888;
    #   conv3 dX+dW 2*589,824*32*4 = 150,994,944; fc dX+dW 2*640*32*8 = 327,680.
    assert cost.backward_bops == 458_031_104
    #   FP32: 18432*1024 + (1,179,648 + 589,824 + 640)*2048
    assert cost.fp32_backward_bops == 3_644_063_744
    assert cost.backward_cost == pytest.approx(0.125692, abs=1e-6)  # W4A4 "costs" 1/8 of FP32
    assert cost.bwd_flops_saved == 0.0


class _TwoLayer(torch.nn.Module):
    """conv 2->3 (3x3, no padding) on 2x5x5, flatten, linear 27->4: small enough to count."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.lin = torch.nn.Linear(27, 4)

    def forward(self, x):
        return self.lin(self.conv(x).flatten(1))


def test_two_layer_net_by_hand_and_by_flop_counter():
    """Every §7 quantity of a two-layer net counted by hand, W4 A2, no first/last override.
    conv: 3x3x3 outputs x (2*3*3) = 486 MACs, 54 weights; linear: 4 x 27 = 108 MACs, 108
    weights. The MACs are cross-checked with FlopCounterMode on a real forward and backward."""
    model = _TwoLayer()
    shape = (2, 5, 5)
    with FlopCounterMode(display=False) as fwd:
        model(torch.randn(1, *shape))
    assert fwd.get_total_flops() == 2 * (486 + 108)
    with FlopCounterMode(display=False) as bwd:  # FP32 step: no dX for the data's layer
        model(torch.randn(1, *shape)).sum().backward()
    assert bwd.get_total_flops() - fwd.get_total_flops() == 2 * (486 + 2 * 108)

    qlayers = convert(model, Precision(w_bits=4, a_bits=2, first_bits=None, last_bits=None))
    rows = layer_costs(model, shape)
    assert [(r.name, r.macs, r.params, r.w_bits, r.a_bits, r.first) for r in rows] == [
        ("conv", 486, 54, 4, 2, True), ("lin", 108, 108, 4, 2, False)]
    cost = compute_cost(rows, extra_param_count(model, qlayers))
    # (54 + 108) * 4 bits + FP32 extras (3 + 4 biases, 2 steps per layer) 11 * 32 = 1000 bits
    assert cost.size_mb == pytest.approx(125e-6, rel=1e-12)
    assert cost.bops == 486 * 8 + 108 * 8 == 4752
    # conv dW 486*32*2 (no dX: first layer); lin dX 108*32*4 + dW 108*32*2
    assert cost.backward_bops == 31_104 + 13_824 + 6_912
    # FP32: conv 486 * 1024 (dW only), lin 108 * 2048 (dX + dW): the counter's backward in MACs
    assert cost.fp32_backward_bops == 497_664 + 221_184 == 1024 * (486 + 2 * 108)
    assert cost.backward_cost == pytest.approx(51_840 / 718_848)
    # 8-bit gradients and half the weights frozen in lin: freezing removes only its dW.
    rows = layer_costs(model, shape, {"lin": {"g_bits": 8, "frozen_fraction": 0.5}})
    cost = compute_cost(rows, 0, extra_backward_bops=5.0)
    assert cost.backward_bops == 5 + 31_104 + 108 * 8 * 4 + 108 * 8 * 2 // 2 == 35_429
    assert cost.bwd_flops_saved == pytest.approx(54 / (2 * 594))


def test_compute_cost_gradient_bits_and_freezing_by_hand():
    rows = [
        LayerCost("a", "conv", params=100, macs=1000, w_bits=8, a_bits=8, g_bits=8, first=True,
                  frozen_fraction=0.5),
        LayerCost("b", "conv", params=200, macs=3000, w_bits=2, a_bits=4, g_bits=4,
                  frozen_fraction=0.25),
    ]
    cost = compute_cost(rows, extra_params=7, extra_backward_bops=11.0)
    # Worked out by hand (not the formula restated): 1424 bits; 64,000 + 24,000 BOPs;
    # backward 11 + a.dW 32,000 (half frozen, no dX: first) + b.dX 24,000 + b.dW 36,000.
    assert cost.size_mb == pytest.approx(178e-6)
    assert cost.bops == 88_000
    assert cost.backward_bops == pytest.approx(92_011)
    assert cost.fp32_backward_bops == 7_168_000
    assert cost.backward_cost == pytest.approx(92_011 / 7_168_000)
    assert cost.bwd_flops_saved == pytest.approx(0.15625)  # (500 + 750) / 8000
    # Freezing removes only dW: everything frozen leaves the extras and b's dX.
    for r in rows:
        r.frozen_fraction = 1.0
    assert compute_cost(rows, 7, 11.0).backward_bops == pytest.approx(11 + 24_000)


def test_modelled_fp32_denominator_is_the_executed_fp32_backward():
    """Two independent paths to the same FP32 training backward: the cost model's denominator
    (bit-ops / 32^2, in MACs) and the FLOPs the trainer's meter counts on a real FP32 step
    (2 per MAC) — so backward_bops and backward_flops share their 1.0."""
    from qsearch.quant.flops import FlopMeter, FlopTotals
    from qsearch.train.costs import fp32_backward_flops_per_sample

    model = build_model("resnet20", 10, 3)
    rows = layer_costs(model, (3, 32, 32))
    cost = compute_cost(rows, 0)
    macs = count_macs(model, (3, 32, 32))
    assert 2 * cost.fp32_backward_bops / 1024 == fp32_backward_flops_per_sample(macs)
    totals = FlopTotals()
    model.train()
    with FlopMeter(totals, model):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(3, 3, 32, 32)),
                                                 torch.tensor([1, 2, 3]))
        with FlopCounterMode(display=False) as counter:  # independent: torch's own count
            loss.backward()
    assert totals.backward == 3 * fp32_backward_flops_per_sample(macs)
    assert counter.get_total_flops() == pytest.approx(totals.backward, rel=1e-9)


MODELS = [("tiny-cnn", (1, 8, 8)), ("resnet20", (3, 32, 32)), ("mobilenetv2", (3, 32, 32))]


@pytest.mark.parametrize("name,shape", MODELS, ids=[m for m, _ in MODELS])
def test_macs_agree_with_torch_flop_counter(name, shape):
    model = build_model(name, 10, shape[0])
    macs = count_macs(model, shape)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    ref = counter.get_total_flops() / 2
    assert ref > 0
    assert sum(macs.values()) == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize("name,shape", MODELS[:2], ids=[m for m, _ in MODELS[:2]])
def test_fp32_backward_macs_agree_with_torch_flop_counter(name, shape):
    """The FP32 backward the cost model normalises by is 2x the forward MACs minus the first
    layer's input gradient. (Only for ungrouped convs: torch's conv-backward formula ignores
    ``groups``, so it over-counts MobileNetV2's depthwise layers.)"""
    model = build_model(name, 10, shape[0])
    rows = layer_costs(model, shape)
    fwd = sum(r.macs for r in rows)
    cost = compute_cost(rows, 0)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, *shape)).sum().backward()
    ref_bwd = counter.get_total_flops() / 2 / 2 - fwd  # per sample, minus the forward
    assert cost.fp32_backward_bops / (32 * 32) == pytest.approx(ref_bwd, rel=0.01)
