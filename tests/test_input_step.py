"""The first conv's step gradient through the adjoint (qsearch.quant.input_step) against
plain autograd through the input gradient, and its FLOP count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsearch.quant import QConv2d
from qsearch.quant.flops import FlopMeter, FlopTotals


def _layer(stride: int, bias: bool, channels_last: bool) -> QConv2d:
    torch.manual_seed(stride + 2 * bias)
    conv = nn.Conv2d(3, 16, 3, stride, 1, bias=bias)
    q = QConv2d.from_float(conv, 4, 8, a_signed=True).train()
    if channels_last:
        q = q.to(memory_format=torch.channels_last)
    return q


def _step(q: QConv2d, x: torch.Tensor, data_in: bool):
    """(output, step grad, weight grad, bias grad, grad_fn name, FLOP totals); ``data_in``
    False makes the input need a gradient, which keeps plain autograd's path."""
    q.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(not data_in)
    totals = FlopTotals()
    with FlopMeter(totals, q):
        out = q(x)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(gy)
    bias = q.bias.grad.clone() if q.bias is not None else None
    return (out.detach(), q.a_quant.step.grad.clone(), q.weight.grad.clone(), bias,
            type(out.grad_fn).__name__, totals)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_step_gradient_through_the_adjoint_equals_autograds(stride, bias, channels_last):
    q = _layer(stride, bias, channels_last)
    x = torch.randn(8, 3, 16, 16) * 2.0  # some inputs beyond the 8-bit range's ends
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q(x)  # the first batch initialises the input step (plain path)
    with torch.no_grad():
        q.a_quant.step.mul_(0.5)  # and clip some values, so both branches of d(x_hat)/ds count
    out_a, gs_a, gw_a, gb_a, fn_a, fl_a = _step(q, x, data_in=True)
    out_p, gs_p, gw_p, gb_p, fn_p, fl_p = _step(q, x, data_in=False)
    assert "InputStep" in fn_a and "InputStep" not in fn_p
    assert torch.equal(out_a, out_p)
    assert torch.allclose(gs_a, gs_p, rtol=1e-4, atol=1e-6), (gs_a, gs_p)
    assert float(gs_a.abs()) > 0
    assert torch.allclose(gw_a, gw_p, rtol=1e-5, atol=1e-6)
    if bias:
        assert torch.allclose(gb_a, gb_p, rtol=1e-5, atol=1e-6)
    # The adjoint's forward conv is counted as the dX GEMM it replaces.
    assert (fl_a.forward, fl_a.dx, fl_a.dw) == (fl_p.forward, fl_p.dx, fl_p.dw)
    assert fl_a.dx > 0


def test_plain_path_where_the_step_is_frozen_or_in_evaluation():
    q = _layer(1, False, False)
    x = torch.randn(4, 3, 8, 8)
    q(x)
    q.a_quant.step.requires_grad_(False)
    assert "InputStep" not in type(q(x).grad_fn).__name__
    q.a_quant.step.requires_grad_(True)
    q.eval()
    assert "InputStep" not in type(q(x).grad_fn).__name__
    q.train()
    assert torch.equal(q(x).detach(), F.conv2d(q.a_quant(x), q.quantized_weight(), None, 1, 1)
                       .detach())


def test_a_trial_that_does_not_compile_compiles_nothing_here():
    """Inside a trial its trainer judged too small to compile, the backward's step derivative
    runs eagerly too (a compilation would cost the trial seconds)."""
    from qsearch.quant import fused

    fused.lsq_step_derivative.reset()
    q = _layer(1, False, False)
    x = torch.randn(16, 3, 64, 64)  # above the size where the kernel would compile
    q(x)
    with fused.trial_kernels() as choice:
        choice.compiled = False
        q(x).sum().backward()
    assert fused.lsq_step_derivative.compiled_variants == 0
    assert q.a_quant.step.grad is not None
