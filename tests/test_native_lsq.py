"""The native LSQ loops (qsearch.quant.native_lsq) against the reference formulas of
qsearch.quant.fused (the ``*_math`` functions, plain torch): outputs and input gradients bit
for bit, special values included, the step gradient within float32 summation error; the same
through ``lsq_quantize`` and a training step, and the same split across threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qsearch.models import build_model
from qsearch.quant import Precision, convert, fused, native_lsq
from qsearch.quant.lsq import _LSQFunction, lsq_quantize

pytestmark = pytest.mark.skipif(native_lsq.status() != "native",
                                reason=f"native LSQ loops unavailable: {native_lsq.status()}")

#: Signed zeros, NaN, infinities, tiny values, and exact ties at s = 0.5 (v/s = 0.5, 1.5, 2.5,
#: -0.5, -1.5: rounding half to even must give 0, 2, 2, -0, -2).
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30,
           0.25, 0.75, 1.25, -0.25, -0.75, 1.55, 100.0]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _inputs(n: int, seed: int, special: bool = True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g) * 0.8
    if special:
        y[: len(SPECIAL)] = torch.tensor(SPECIAL[:n])
    return y, torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 7, 16, 33, 1000, 4099])
@pytest.mark.parametrize("qn,qp", [(0, 15), (0, 3), (8, 7), (2, 1), (128, 127)])
@pytest.mark.parametrize("step", [0.5, 0.1])
def test_forward_and_gradients_match_the_reference_bit_for_bit(n, qn, qp, step):
    y, g1, g2 = _inputs(n, n * 31 + qp)
    s = torch.tensor([step])
    step = float(s)
    lo, hi = fused.bounds(qn, qp, s)
    assert _same_bits(native_lsq.lsq_forward(y, step, -qn, qp),
                      fused.lsq_forward_math(y, s, lo, hi))
    gv, _ = native_lsq.lsq_backward(g1, y, step, -qn, qp)
    assert _same_bits(gv, fused.lsq_backward_math(g1, y, s, lo, hi)[0])
    if qn == 0:  # the ReLU-fused pair reads an unsigned quantizer
        r, q = native_lsq.relu_lsq_forward(y, step, 0.0, qp, True)
        r_ref, q_ref = fused.relu_lsq_forward_math(y, s, lo, hi)
        assert _same_bits(r, r_ref) and _same_bits(q, q_ref)
        assert _same_bits(native_lsq.relu_lsq_forward(y, step, 0.0, qp, False)[1], q_ref)
        gy, _ = native_lsq.relu_lsq_backward(g1, g2, y, step, 0.0, qp)
        assert _same_bits(gy, fused.relu_lsq_backward_math(g1, g2, y, s, lo, hi)[0])
        gy, _ = native_lsq.relu_lsq_backward(None, g2, y, step, 0.0, qp)
        assert _same_bits(gy, fused.relu_lsq_backward_q_math(g2, y, s, lo, hi)[0])


@pytest.mark.parametrize("n", [5, 1000, 70000])
def test_step_gradient_is_the_reference_sum(n):
    y, g1, g2 = _inputs(n, n, special=False)
    s = torch.tensor([0.07])
    step = float(s)  # the float32 value, as the autograd functions pass it
    for qn, qp in ((8, 7), (0, 15)):
        lo, hi = fused.bounds(qn, qp, s)
        ref = float(fused.lsq_backward_math(g1, y, s, lo, hi)[1].double())
        exact = float((g1.double() * fused.lsq_step_derivative_math(y, s, lo, hi).double()).sum())
        got = native_lsq.lsq_backward(g1, y, step, -qn, qp)[1]
        assert got == pytest.approx(exact, rel=1e-5, abs=1e-4) and got == pytest.approx(
            ref, rel=1e-4, abs=1e-3)
        assert native_lsq.lsq_backward(g1, y, step, -qn, qp, need_v=False)[1] == pytest.approx(
            got, rel=1e-12)
    lo, hi = fused.bounds(0, 15, s)
    ref = float(fused.relu_lsq_backward_math(g1, g2, y, s, lo, hi)[1])
    assert native_lsq.relu_lsq_backward(g1, g2, y, step, 0.0, 15)[1] == pytest.approx(
        ref, rel=1e-4, abs=1e-3)


def test_several_threads_send_large_tensors_to_the_compiled_kernels(threads):
    big, small = torch.zeros(native_lsq.PARALLEL_MIN_NUMEL), torch.zeros(1000)
    threads(1)
    assert native_lsq.preferred(big, True) and native_lsq.preferred(small, True)
    threads(2)
    assert not native_lsq.preferred(big, True) and native_lsq.preferred(small, True)
    assert native_lsq.preferred(big, False)  # no compiled kernel: the loop still serves


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("frozen", ["none", "input", "step"])
def test_lsq_quantize_on_native_loops_equals_the_eager_function(channels_last, frozen):
    """Values, input gradient (bit for bit) and step gradient of the autograd function that
    ``lsq_quantize`` picks on CPU, against the eager one; layouts are kept."""
    torch.manual_seed(0)
    v0 = torch.randn(4, 8, 6, 5)
    if channels_last:
        v0 = v0.contiguous(memory_format=torch.channels_last)
    gq = torch.randn(4, 8, 6, 5)
    grads = []
    for use_native in (True, False):
        v = v0.clone().requires_grad_(frozen != "input")
        s = torch.tensor([0.3], requires_grad=frozen != "step")
        out = lsq_quantize(v, s, 8, 7, 0.05) if use_native else \
            _LSQFunction.apply(v, s, 8, 7, 0.05)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        (out * gq).sum().backward()
        grads.append((out.detach(), v.grad, s.grad))
    (o1, gv1, gs1), (o2, gv2, gs2) = grads
    assert torch.equal(o1, o2)
    if frozen == "input":
        assert gv1 is None and gv2 is None
    else:
        assert torch.equal(gv1, gv2)
    if frozen == "step":
        assert gs1 is None and gs2 is None
    else:
        assert torch.allclose(gs1, gs2, rtol=1e-5, atol=1e-7)


def test_inference_forward_matches_the_reference_bit_for_bit():
    v = torch.randn(3, 100)
    s = torch.tensor([0.2])
    with torch.no_grad():
        got = lsq_quantize(v, s, 2, 1, 1.0)
    lo, hi = fused.bounds(2, 1, s)
    assert _same_bits(got, fused.lsq_forward_math(v, s, lo, hi))


def test_training_step_is_the_eager_step(monkeypatch, threads):
    """A W4A4 ResNet-20 step on the native loops (weights and activations, fused ReLUs)
    gives the eager path's loss and gradients."""
    def step(native: bool):
        monkeypatch.setenv("QSEARCH_COMPILE", "auto" if native else "0")
        torch.manual_seed(0)
        model = build_model("resnet20", 10, 3)
        convert(model, Precision(w_bits=4, a_bits=4, first_bits=8, last_bits=8))
        model.train().to(memory_format=torch.channels_last)
        x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        model(x)
        model.zero_grad()
        loss = F.cross_entropy(model(x), torch.arange(16) % 10)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    threads(1)  # with more, large tensors go to the compiled kernels
    for k in (fused.lsq_forward, fused.relu_lsq_forward):
        k.reset()
    loss_n, grads_n = step(True)
    assert not fused.lsq_forward.compiled_variants and not fused.relu_lsq_forward.compiled_variants
    loss_e, grads_e = step(False)
    assert loss_n == loss_e
    for name, gn in grads_n.items():
        ge = grads_e[name]
        tol = (1e-4 if name.endswith("step") else 1e-5) * float(ge.abs().max()) + 1e-7
        assert float((gn - ge).abs().max()) <= tol, name


def test_switched_off_by_the_compile_switch(monkeypatch):
    monkeypatch.setenv("QSEARCH_COMPILE", "0")
    assert not native_lsq.usable(torch.zeros(4)) and native_lsq.status() == "off"
    monkeypatch.delenv("QSEARCH_COMPILE")
    assert native_lsq.usable(torch.zeros(4))
    assert not native_lsq.usable(torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(), (1,)])
def test_step_gradient_has_the_steps_shape_and_the_eager_value(shape):
    """A 0-dim or 1-element step gets its own shape back, with the eager function's value
    (autograd would silently sum a (1,) gradient into a 0-dim step, so the value is checked)."""
    v0 = torch.randn(50)
    grads = []
    for fn in (lsq_quantize, _LSQFunction.apply):
        v = v0.clone().requires_grad_()
        s = torch.full(shape, 0.1, requires_grad=True)
        fn(v, s, 8, 7, 0.3).sum().backward()
        assert s.grad.shape == s.shape and s.grad.dtype == s.dtype
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
