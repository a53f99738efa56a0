"""Fused (compiled) fake-quantization kernels of qsearch.quant.fused against the eager
reference implementations: LSQ values and gradients, the stochastic-rounding gradient
quantizer's values given the same noise, its unbiasedness and seeding, and the eager fallback.

The references below are literal copies of the eager implementations the kernels replace, so
a change to a kernel cannot also change what it is compared with."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from qsearch.methods.gradq import sr_quantize
from qsearch.quant import fused, native_lsq
from qsearch.quant.lsq import _LSQFunction, _LSQFusedFunction, level_bounds, lsq_quantize

needs_compile = pytest.mark.skipif(not fused.compile_enabled("cpu"),
                                   reason="torch.compile unavailable (no C++ compiler?)")


@pytest.fixture
def native_off():
    """The compiled path where ``lsq_quantize`` would take the native CPU loops first
    (qsearch.quant.native_lsq, tested in test_native_lsq.py)."""
    native_lsq.set_enabled(False)
    yield
    native_lsq.set_enabled(True)


# ----------------------------------------------------------------------------- references


def _ref_grid(lo, hi, bits):
    """The eager quantizer's grid (qsearch.methods.gradq.sr_grid before the fused kernels)."""
    n = float(2**bits - 1)
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    span = (hi - lo).clamp_min(torch.finfo(hi.dtype).tiny)
    zp = (-lo / span * n).round()
    zp = torch.where(lo < 0, zp.clamp_min(1.0), zp)
    zp = torch.where(hi > 0, zp.clamp_max(n - 1.0), zp)
    scale = torch.maximum(-lo / zp.clamp_min(1.0), hi / (n - zp).clamp_min(1.0))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, -zp, n - zp


def _ref_minmax(g, keep):
    if keep is None:
        return torch.aminmax(g)
    dims = tuple(d for d in range(g.dim()) if d != keep % g.dim())
    return g.amin(dim=dims, keepdim=True), g.amax(dim=dims, keepdim=True)


def _ref_sr(g, bits, keep, u):
    """The eager SR quantizer (gradq.sr_quantize) with the noise ``u`` given."""
    lo, hi = _ref_minmax(g, keep)
    scale, qmin, qmax = _ref_grid(lo, hi, bits)
    out = u.clone()
    out.addcmul_(g, scale.reciprocal()).floor_()
    return out.clamp_(qmin, qmax).mul_(scale).to(g.dtype)


def _scales(x, bits, keep):
    lo, hi = _ref_minmax(x, keep)
    return _ref_grid(lo, hi, bits)[0].expand_as(x)


def _sample_tensor(seed=0, shape=(6, 5, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 0, shape[0]).view(-1, 1, 1, 1)
    x[x.abs() < 0.2 * x.abs().amax(dim=(1, 2, 3), keepdim=True)] = 0.0  # exact zeros
    x[1] = x[1].abs()
    x[2] = -x[2].abs()
    x[3] = 0.0
    return x


def _noise_for(g, keep, seeds):
    """The noise the compiled kernel draws for ``g`` (same counter hash, run eagerly)."""
    return fused.hash_uniform(fused.as_3d(g, keep), seeds).view(g.shape)


# ----------------------------------------------------------------------------- LSQ


def _lsq_both(v0, s0, qn, qp, g, need_v=True, need_s=True, fn=_LSQFusedFunction):
    v = v0.clone().requires_grad_(need_v)
    s = s0.clone().requires_grad_(need_s)
    out = fn.apply(v, s, qn, qp, g)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(gy)
    return out.detach(), v.grad, s.grad, gy


LSQ_CASES = [(4, True, (64, 33)), (4, False, (5, 7, 9, 11)), (8, False, (2, 16, 31, 17)),
             (2, True, (1000,))]


@needs_compile
@pytest.mark.parametrize("bits,signed,shape", LSQ_CASES)
def test_lsq_fused_matches_eager(bits, signed, shape):
    """Forward and input gradient bit for bit; step gradient within float32 summation error."""
    torch.manual_seed(bits)
    v = torch.randn(shape) * 2.0
    if not signed:
        v = v.relu()
    qn, qp = level_bounds(bits, signed)
    s = torch.tensor([0.37])
    g = 1.0 / math.sqrt(v.numel() * qp)
    out_f, gv_f, gs_f, gy = _lsq_both(v, s, qn, qp, g)
    out_e, gv_e, gs_e, _ = _lsq_both(v, s, qn, qp, g, fn=_LSQFunction)
    assert torch.equal(out_f, out_e)
    assert torch.equal(gv_f, gv_e)
    # Step gradient: the same dot product summed in another order. Bound against float64.
    vs = v.double() / s.double()
    q = vs.clamp(-qn, qp)
    exact = (gy.double() * torch.where(q == vs, q.round() - vs, q.round())).sum() * g
    scale = (gy.double() * (q.round() - vs)).abs().sum() * g + 1e-30
    assert abs(float(gs_f) - float(exact)) <= 1e-5 * float(scale)
    assert abs(float(gs_f) - float(gs_e)) <= 2e-5 * float(scale)
    # The in-range mask is not trivial here: some values clamp, some do not.
    assert 0 < int((gv_f == 0).sum()) < v.numel() or not signed


@needs_compile
@pytest.mark.parametrize("need_v,need_s", [(True, False), (False, True)])
def test_lsq_fused_partial_gradients(need_v, need_s):
    torch.manual_seed(0)
    v, s, (qn, qp) = torch.randn(8, 3, 5, 5) * 3, torch.tensor([0.5]), level_bounds(4, True)
    out_f, gv_f, gs_f, _ = _lsq_both(v, s, qn, qp, 0.1, need_v, need_s)
    out_e, gv_e, gs_e, _ = _lsq_both(v, s, qn, qp, 0.1, need_v, need_s, fn=_LSQFunction)
    assert torch.equal(out_f, out_e)
    if need_v:
        assert torch.equal(gv_f, gv_e) and gs_f is None
    else:
        assert gv_f is None and torch.allclose(gs_f, gs_e, rtol=1e-5, atol=1e-7)



@needs_compile
@pytest.mark.parametrize("fn", [_LSQFusedFunction, _LSQFunction], ids=["fused", "eager"])
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_lsq_keeps_a_channels_last_layout(grad_layout, fn):
    """A channels-last activation comes out channels-last (the next conv must not reorder
    it), with the same values and gradients as the contiguous tensor, also when the incoming
    gradient has the other layout. Fails when the kernel is fed ``v.reshape(-1)`` (a copy in
    NCHW order, so the output is NCHW) or its result is mapped back in the wrong order."""
    torch.manual_seed(2)
    cl = torch.channels_last
    base = torch.randn(4, 6, 5, 7) * 2
    qn, qp = level_bounds(4, True)
    s = torch.tensor([0.3])
    ref = _lsq_both(base, s, qn, qp, 0.1)  # the contiguous tensor (and its gradient gy)
    gy = ref[3]
    v_cl = base.contiguous(memory_format=cl)
    v = v_cl.clone().requires_grad_(True)
    sp = s.clone().requires_grad_(True)
    out = fn.apply(v, sp, qn, qp, 0.1)
    assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()
    g_in = gy.contiguous(memory_format=cl) if grad_layout == "channels_last" else gy
    out.backward(g_in)
    assert torch.equal(out.detach(), ref[0])
    assert v.grad.is_contiguous(memory_format=cl)
    assert torch.equal(v.grad, ref[1])
    assert torch.allclose(sp.grad, ref[2], rtol=1e-5, atol=1e-7)


@pytest.fixture(autouse=True)
def _fresh_kernels():
    """A kernel an earlier test in the process broke (a recompile limit, a trace) stays on its
    eager path; each test here starts from compiled kernels again."""
    kernels = [k for k in vars(fused).values() if isinstance(k, fused.FusedKernel)]
    for k in kernels:
        k.reset()
    yield


@needs_compile
def test_lsq_quantize_uses_fused_path_and_inference_matches(native_off):
    torch.manual_seed(1)
    v = torch.randn(16, 8, 24, 24, requires_grad=True)
    assert v.numel() >= fused.LSQ_MIN_NUMEL
    s = torch.nn.Parameter(torch.tensor([0.21]))
    qn, qp = level_bounds(4, True)
    out = lsq_quantize(v, s, qn, qp, 0.05)
    assert out.grad_fn is not None and "LSQFused" in type(out.grad_fn).__name__
    small = lsq_quantize(v[:1, :1], s, qn, qp, 0.05)  # below LSQ_MIN_NUMEL: eager
    assert type(small.grad_fn).__name__ == "_LSQFunctionBackward"
    with torch.no_grad():
        inf = lsq_quantize(v, s, qn, qp, 0.05)
    ref = (v.detach() * s.detach().reshape(()).reciprocal()).clamp(-qn, qp).round() * s.detach()
    assert torch.equal(inf, ref) and torch.equal(out.detach(), ref)


# ----------------------------------------------------------------------------- SR gradients


SR_CASES = [(None, (6, 5, 3, 7)), (0, (6, 5, 3, 7)), (1, (6, 5, 3, 7)), (-1, (37, 6)),
            (None, (64, 16, 8, 8))]


@needs_compile
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("keep,shape", SR_CASES)
def test_sr_kernel_matches_reference_given_the_noise(bits, keep, shape):
    """Bit-exact: the compiled kernel (min/max, grid, in-kernel noise, rounding) equals the eager
    quantizer fed the same noise. This catches a wrong grid, a wrong rounding, wrong noise."""
    x = _sample_tensor(bits, shape) if len(shape) == 4 else torch.randn(shape) * 1e-3
    x[0] = x[0].abs()  # a one-signed row too
    seeds = torch.tensor([12345, -678], dtype=torch.int32)
    n = torch.tensor(float(2**bits - 1))
    got = fused.sr_quantize_fused(fused.as_3d(x, keep), seeds, n).view(x.shape)
    want = _ref_sr(x, bits, keep, _noise_for(x, keep, seeds))
    assert torch.equal(got, want)
    assert torch.equal(got[x == 0], torch.zeros_like(got[x == 0]))


@needs_compile
@pytest.mark.parametrize("keep", [None, 0, 1])
def test_sr_fused_within_one_level_of_eager(keep):
    """Against the eager quantizer with its own (NumPy) noise: each value is one of the two
    grid points around it in both, so they differ by at most one level, and zero stays zero."""
    x = _sample_tensor(3)
    s = _scales(x, 4, keep)
    fast = sr_quantize(x, 4, keep, generator=torch.Generator().manual_seed(0))
    eager = _ref_sr(x, 4, keep, torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))
    assert bool(((fast - eager).abs() <= s * (1 + 1e-6)).all())
    assert bool(((fast - x).abs() < s).all())
    assert bool((fast[x == 0] == 0).all())


@needs_compile
@pytest.mark.parametrize("keep", [None, 0, 1, 2])
def test_sr_fused_on_a_channels_last_gradient(keep):
    """The trainer's gradients are channels-last on CPU: the quantized gradient keeps that
    layout (per tensor, sample and channel; other grid dimensions take the NCHW path), every
    value is one of the two grid points of *its own* group's grid around it, and the mean of
    many draws is the gradient. Fails when the NHWC view groups elements wrongly (a wrong
    grid, so values off their grid) or the result is mapped back in the wrong order."""
    x = _sample_tensor(4, (6, 5, 4, 7)).contiguous(memory_format=torch.channels_last)
    lo, hi = _ref_minmax(x.contiguous(), keep)
    scale = _ref_grid(lo, hi, 4)[0]
    gen = torch.Generator().manual_seed(5)
    total = torch.zeros(x.shape, dtype=torch.float64)
    draws = 300
    for _ in range(draws):
        q = sr_quantize(x, 4, keep, generator=gen)
        assert q.is_contiguous(memory_format=torch.channels_last) == (keep != 2)
        level = q / scale
        assert torch.allclose(level, level.round(), atol=1e-3)  # on its group's grid
        assert bool(((q - x).abs() < scale.expand_as(x) * (1 + 1e-6)).all())
        total += q.double()
    sd = scale.expand_as(x).double() / 2 / draws ** 0.5  # a draw's spread is <= scale/2
    assert bool(((total / draws - x.double()).abs() <= 5 * sd + 1e-12).all())


@needs_compile
def test_sr_fused_rounds_stochastically_not_to_nearest():
    """A value 0.3 levels above a grid point goes up in ~30% of draws (nearest: never)."""
    x = torch.zeros(4096)
    x[0], x[1] = -1.0, 1.0  # grid: 8 bits over [-1, 1], zero point 127 or 128
    s = float(_scales(x, 8, None)[0])
    x[2:] = 0.3 * s
    ups = 0
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        q = sr_quantize(x, 8, None, generator=gen)
        ups += int((q[2:] > 0).sum())
    frac = ups / (20 * (x.numel() - 2))
    assert abs(frac - 0.3) < 0.01, frac


@needs_compile
def test_sr_fused_is_seeded_by_torch_rng():
    x = torch.randn(3, 4, 5, 6)
    torch.manual_seed(3)
    a = sr_quantize(x, 4, 0)
    b = sr_quantize(x, 4, 0)
    torch.manual_seed(3)
    assert torch.equal(a, sr_quantize(x, 4, 0))  # reproducible under the seed
    assert not torch.equal(a, b)  # a fresh draw per call (per step)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(sr_quantize(x, 4, 1, generator=g1), sr_quantize(x, 4, 1, generator=g2))


def test_hash_noise_is_uniform_and_decorrelated():
    g = torch.empty(1 << 18)
    u = fused.hash_uniform(g, torch.tensor([5, 6], dtype=torch.int32))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(float(u.var()) - 1 / 12) < 1e-3
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    # Neighbouring seeds give unrelated streams, not shifted copies.
    v = fused.hash_uniform(g, torch.tensor([6, 6], dtype=torch.int32))
    w = fused.hash_uniform(g, torch.tensor([5, 7], dtype=torch.int32))
    for other in (v, w):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01
        assert not bool(torch.isin(u[:1000], other).all())


# ----------------------------------------------------------------------------- fallback


def test_env_var_disables_compilation(monkeypatch):
    monkeypatch.setenv(fused.ENV_DISABLE, "1")
    assert not fused.compile_enabled("cpu")
    x = _sample_tensor()
    assert fused.sr_quantize(x, 4) is None
    q = sr_quantize(x, 4, 0, generator=torch.Generator().manual_seed(0))  # eager path
    assert bool(((q - x).abs() < _scales(x, 4, 0)).all())
    v = torch.randn(3, 5, requires_grad=True)
    out = lsq_quantize(v, torch.nn.Parameter(torch.tensor([0.3])), 8, 7, 0.1)
    assert type(out.grad_fn).__name__ == "_LSQFunctionBackward"


@needs_compile
def test_compile_failure_falls_back_with_one_warning():
    def not_compilable(x):
        torch._dynamo.graph_break()  # fullgraph=True refuses this
        return x + 1

    k = fused.FusedKernel(not_compilable, "test")
    x = torch.ones(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert torch.equal(fused.run_or_eager(k, x), x + 1)
        assert torch.equal(fused.run_or_eager(k, x), x + 1)
    assert k.broken and not k.usable(x)
    assert len([m for m in w if "fused kernel test" in str(m.message)]) == 1


@needs_compile
def test_a_flop_counter_does_not_switch_the_fused_kernels_off(native_off):
    """Under FlopCounterMode (a dispatch mode dynamo does not trace) the LSQ runs eagerly for
    that call only; afterwards the fused kernel is used again, so a process's numerics do not
    depend on whether some earlier step was counted. Fails if the failure is remembered."""
    from torch.utils.flop_counter import FlopCounterMode

    v = torch.randn(fused.LSQ_MIN_NUMEL, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fused kernel unavailable" warning either
        with FlopCounterMode(display=False):
            lsq_quantize(v, s, 8, 7, 1.0).sum().backward()
        assert fused.lsq_forward.usable(v)
        lsq_quantize(v, s, 8, 7, 1.0).sum().backward()
    assert fused.lsq_forward._compiled  # the fused path ran after the mode was gone
