"""LSQ quantizer (METHODS.md §1): forward against PyTorch's reference fake-quantizer, the
step-size and straight-through gradients against the formula computed by hand, the step
initialisation, bits=32 as identity, and the quantized layers built on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsearch.quant import LSQQuantizer, QConv2d, QLinear, level_bounds, lsq_quantize

BITS = [2, 3, 4, 8]


def _values(signed: bool, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Values spread well beyond the clipping range, plus exact ties (x.5 * s) so the
    round-half-to-even convention is exercised too."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g) * 3.0
    return v if signed else v.abs()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["weight-signed", "act-unsigned"])
def test_forward_matches_torch_fake_quantize(bits, signed):
    qn, qp = level_bounds(bits, signed)
    assert (qn, qp) == ((2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1))
    v = _values(signed)
    for scale in (0.0371, 0.25, 1.3):
        s = torch.tensor([scale])
        ties = (torch.arange(-qn - 2, qp + 3, dtype=torch.float32) + 0.5) * s
        x = torch.cat([v, ties])
        ours = lsq_quantize(x, s, qn, qp, 1.0)
        ref = torch.fake_quantize_per_tensor_affine(
            x, s, torch.zeros(1, dtype=torch.int32), -qn, qp
        )
        assert torch.equal(ours, ref), (bits, signed, scale)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", ["weight", "act"])
def test_module_forward_matches_torch_fake_quantize(bits, kind):
    """The module path (with its own grad scale and sign handling) gives the same values."""
    q = LSQQuantizer(bits, kind, signed=False if kind == "act" else None)
    v = torch.randn(8, 3, 5, 5)
    if kind == "act":
        v = F.relu(v)
    q.init_step(v)
    qn, qp = q.bounds()
    ref = torch.fake_quantize_per_tensor_affine(
        v, q.step.detach(), torch.zeros(1, dtype=torch.int32), -qn, qp
    )
    assert torch.equal(q(v), ref)


def _hand_step_grad(v, s, upstream, qn, qp, g):
    """METHODS.md §1, written out: (round(v/s) - v/s) inside, -Qn below, Qp above, times g."""
    total = 0.0
    for vi, ui in zip(v.tolist(), upstream.tolist(), strict=True):
        r = vi / s
        if r < -qn:
            d = -qn
        elif r > qp:
            d = qp
        else:
            d = round(r) - r  # Python's round is half-to-even, like torch.round
        total += ui * d
    return total * g


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_step_and_input_gradients_match_formula(bits, signed):
    qn, qp = level_bounds(bits, signed)
    v = _values(signed, n=600, seed=bits).double()
    s_val = 0.4 if bits < 8 else 0.02
    v = v.requires_grad_(True)
    s = torch.tensor([s_val], dtype=torch.float64, requires_grad=True)
    g = 1.0 / math.sqrt(v.numel() * qp)
    upstream = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = lsq_quantize(v, s, qn, qp, g)
    out.backward(upstream)

    expected = _hand_step_grad(v.detach(), s_val, upstream, qn, qp, g)
    assert s.grad.shape == (1,)
    assert s.grad.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)

    # Straight-through estimator: dL/dv = upstream inside [-Qn, Qp], 0 outside.
    r = v.detach() / s_val
    inside = (r >= -qn) & (r <= qp)
    assert 0 < int(inside.sum()) < v.numel()  # both regimes are exercised
    assert torch.equal(v.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_gradient_scale_uses_layer_size_for_weights_and_features_for_activations():
    """g = 1/sqrt(N*Qp): N = all weight elements, or features of one sample for activations."""
    torch.manual_seed(0)
    for kind, shape in (("weight", (6, 3, 3, 3)), ("act", (5, 3, 4, 4))):
        q = LSQQuantizer(4, kind, signed=True)
        v = torch.randn(shape)
        q.init_step(v)
        s_val = q.step.item()
        up = torch.randn(shape)
        q(v).backward(up)
        qn, qp = q.bounds()
        n = v.numel() if kind == "weight" else v[0].numel()
        expected = _hand_step_grad(v.flatten().double(), s_val, up.flatten().double(), qn, qp,
                                   1.0 / math.sqrt(n * qp))
        assert q.step.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-7), kind


@pytest.mark.parametrize("signed", [True, False])
def test_step_gradient_matches_finite_difference_of_the_ste_surrogate(signed):
    """Independently of the closed-form LSQ formula: the LSQ step gradient is g times the
    derivative of the straight-through surrogate f(s) = s * (clamp(v/s, -Qn, Qp) + c), where
    c = clamp(round(v/s0)) - clamp(v/s0) is held fixed (rounding passes the gradient
    straight through). f is piecewise linear in s, so a central difference away from the
    clip boundaries is exact up to round-off."""
    qn, qp = level_bounds(3, signed)
    v = torch.tensor([-2.9, -1.26, -0.31, 0.0, 0.17, 0.55, 0.94, 1.33, 2.2, 4.1],
                     dtype=torch.float64)
    v = v if signed else v.abs()
    s0, g, h = 0.37, 0.23, 1e-7
    up = torch.linspace(-1.0, 1.3, v.numel(), dtype=torch.float64)
    c = ((v / s0).round().clamp(-qn, qp) - (v / s0).clamp(-qn, qp))

    def surrogate(s: float) -> float:
        return float((up * s * ((v / s).clamp(-qn, qp) + c)).sum())

    r = v / s0
    assert bool(((r < -qn) | (r > qp)).any()) and bool(((r > -qn) & (r < qp)).any())
    fd = g * (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    s = torch.tensor([s0], dtype=torch.float64, requires_grad=True)
    lsq_quantize(v, s, qn, qp, g).backward(up)
    assert s.grad.item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # ...and it is not the derivative of the real (piecewise-constant-in-round) forward.
    real = lambda s_: float((up * (v / s_).round().clamp(-qn, qp) * s_).sum())
    assert abs(g * (real(s0 + h) - real(s0 - h)) / (2 * h) - fd) > 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_step_initialisation(bits):
    v = torch.randn(64, 32, 3, 3)
    q = LSQQuantizer(bits, "weight")
    assert not bool(q.initialized)
    q.init_step(v)
    _, qp = level_bounds(bits, True)
    expected = 2 * v.abs().mean().item() / math.sqrt(qp)
    assert q.step.item() == pytest.approx(expected, rel=1e-6)
    assert bool(q.initialized)


def test_activation_step_initialised_from_first_training_batch_and_sign_detected():
    q = LSQQuantizer(4, "act")  # sign decided from the data
    q.train()
    x1 = F.relu(torch.randn(16, 8)) + 0.1
    q(x1)
    assert not q.signed
    assert q.step.item() == pytest.approx(2 * x1.abs().mean().item() / math.sqrt(15), rel=1e-6)
    step1 = q.step.item()
    q(x1 * 10)  # later batches do not re-initialise
    assert q.step.item() == step1

    q2 = LSQQuantizer(4, "act")
    q2.train()
    x2 = torch.randn(16, 8)
    q2(x2)
    assert q2.signed and q2.bounds() == (8, 7)
    assert q2.step.item() == pytest.approx(2 * x2.abs().mean().item() / math.sqrt(7), rel=1e-6)


def test_bits32_is_identity():
    v = torch.randn(4, 5, requires_grad=True)
    for kind in ("weight", "act"):
        q = LSQQuantizer(32, kind)
        q.train()
        assert not q.enabled
        out = q(v)
        assert out is v
        assert not bool(q.initialized)
    layer = QConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), 32, 32)
    x = torch.randn(2, 3, 6, 6)
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1)
    assert torch.equal(layer(x), ref)


def test_quantizer_state_dict_round_trip():
    torch.manual_seed(0)
    q = LSQQuantizer(3, "act")
    q.train()
    x = torch.randn(8, 4, 5, 5)  # negative values: signed grid
    q(x)
    with torch.no_grad():
        q.step.mul_(1.37)  # as if trained
    fresh = LSQQuantizer(8, "act", signed=False)
    fresh.load_state_dict(q.state_dict())
    assert fresh.bits == 3
    assert fresh.signed
    assert bool(fresh.initialized)
    assert torch.equal(fresh.step, q.step)
    fresh.eval(), q.eval()
    assert torch.equal(fresh(x), q(x))

    # Disabled and unset-sign state also survives.
    off = LSQQuantizer(32, "act")
    target = LSQQuantizer(4, "act", signed=True)
    target.load_state_dict(off.state_dict())
    assert not target.enabled and int(target.signed_buf) == -1 and not bool(target.initialized)


def test_set_bits_reinitialises():
    conv = nn.Conv2d(4, 8, 3)
    q = QConv2d.from_float(conv, 4, 4)
    s4 = q.w_quant.step.item()
    q.set_precision(2, 3)
    assert (q.w_bits, q.a_bits) == (2, 3)
    assert q.w_quant.step.item() == pytest.approx(2 * conv.weight.abs().mean().item() / math.sqrt(1))
    assert q.w_quant.step.item() != s4
    assert not bool(q.a_quant.initialized)


def test_qconv_and_qlinear_forward_is_conv_of_fake_quantized_tensors():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
    q = QConv2d.from_float(conv, 4, 4, a_signed=True)
    assert torch.equal(q.weight, conv.weight)
    x = torch.randn(2, 3, 9, 9)
    q.train()
    out = q(x)
    zero = torch.zeros(1, dtype=torch.int32)
    xq = torch.fake_quantize_per_tensor_affine(x, q.a_quant.step.detach(), zero, -8, 7)
    wq = torch.fake_quantize_per_tensor_affine(q.weight, q.w_quant.step.detach(), zero, -8, 7)
    assert torch.equal(out, F.conv2d(xq, wq, q.bias, 2, 1))
    out.sum().backward()
    assert q.weight.grad is not None and q.w_quant.step.grad is not None
    assert q.a_quant.step.grad is not None

    lin = nn.Linear(6, 3)
    ql = QLinear.from_float(lin, 3, 5)
    h = F.relu(torch.randn(4, 6))
    ql.train()
    out = ql(h)
    hq = torch.fake_quantize_per_tensor_affine(h, ql.a_quant.step.detach(), zero, 0, 31)
    wq = torch.fake_quantize_per_tensor_affine(ql.weight, ql.w_quant.step.detach(), zero, -4, 3)
    assert torch.equal(out, F.linear(hq, wq, ql.bias))
