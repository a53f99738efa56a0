"""The first conv of a network: its input is data (no gradient), quantized with a learned step.

LSQ learns that step like any other, so plain autograd must compute the conv's input gradient
``dX = W^T dY`` only to contract it with the step derivative ``d = d(x_hat)/ds`` — a backward
FP32 training never runs. For a stem with few input channels (3 for images) that backward-data
convolution is the slow direction: on ResNet-20's 3->16 stem at batch 128 (channels-last, one
CPU thread) it takes 4.1 ms against 1.1 ms for the forward convolution of the same shape.

The step gradient only needs the contraction, and a convolution's adjoint gives it from the
forward direction: ``<W^T dY, d> = <dY, W d>`` (stride, padding, dilation and groups are all
linear maps, and the bias does not depend on the input). So the backward here convolves ``d``
forward with the same weight and takes its dot product with ``dY``: the same MACs as dX
(counted as that GEMM by the FLOP meter), the same step gradient up to float32 summation
order, and the weight and bias gradients as autograd's.

Measured (one CPU thread, channels-last, median of repeated calls): on ResNet-18's 3->64 7x7
stride-2 stem at batch 32 and 224x224, the backward-data conv takes 265 ms and the forward conv
with the dot product 107 ms. On ResNet-20 at batch 128 the whole training step showed no
difference beyond the noise (402.6 vs 399.7 ms per step, 11 interleaved rounds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qsearch.quant import flops, fused
from qsearch.quant.functional import _pair, _record_backward
from qsearch.quant.lsq import LSQQuantizer, lsq_quantize
from qsearch.quant.memory_order import flat, memory_order, unflat


class _InputStepConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, s, w, b, stride, padding, dilation, groups, qn: int, qp: int,  # type: ignore[override]
                g: float):
        with torch.no_grad():
            x_hat = lsq_quantize(v, s, qn, qp, g)
        ctx.save_for_backward(v, s, x_hat, w)
        ctx.conf = (stride, padding, dilation, groups, qn, qp, g, b is not None)
        return F.conv2d(x_hat, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        v, s, x_hat, w = ctx.saved_tensors
        stride, padding, dilation, groups, qn, qp, g, has_bias = ctx.conf
        need_s, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_b = has_bias and ctx.needs_input_grad[3]
        _record_backward(gy.numel() * w[0].numel(), (need_s, need_w), None, w.shape[0])
        gs = gw = gb = None
        if need_w or need_b:
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy, x_hat, w, [w.shape[0]] if has_bias else None, _pair(stride),
                _pair(padding), _pair(dilation), False, [0, 0], groups, [False, need_w, need_b])
        if need_s:
            lo, hi = fused.bounds(qn, qp, v)
            order = memory_order(v)
            args = (flat(v, order), s, lo, hi)
            kernel = fused.lsq_step_derivative
            # Compiled only where the forward's quantizer would be (a large input, and a trial
            # that compiles): otherwise a small trial would pay a compilation here.
            if v.numel() >= fused.LSQ_MIN_NUMEL and kernel.usable(v):
                d = fused.run_or_eager(kernel, *args)
            else:
                d = kernel.fn(*args)
            d = unflat(d, v, order)
            z = F.conv2d(d, w, None, stride, padding, dilation, groups)
            z_order = memory_order(z)
            if z_order is not None and z_order == memory_order(gy):
                dot = torch.dot(flat(z, z_order), flat(gy, z_order))
            else:
                dot = (z * gy).sum()
            gs = (dot * g).reshape(1).to(s.dtype)
        return None, gs, gw, gb, None, None, None, None, None, None, None


def applies(x: torch.Tensor, quantizer: LSQQuantizer, training: bool, custom_backward: bool
            ) -> bool:
    """Whether a quantized conv's input is data whose only gradient is its quantizer's step:
    training with gradients, an input that needs none, an initialised quantizer whose step
    learns, and no method-specific backward on the layer (LTS, gradq keep the plain path)."""
    return (training and torch.is_grad_enabled() and not x.requires_grad and x.dim() == 4
            and quantizer.enabled and quantizer.is_initialized
            and quantizer.step.requires_grad and not custom_backward)


def conv2d(x: torch.Tensor, quantizer: LSQQuantizer, w: torch.Tensor, b: torch.Tensor | None,
           stride, padding, dilation, groups) -> torch.Tensor:
    """``conv2d(quantizer(x), w, b)`` with the step gradient taken through the adjoint (see
    the module docstring); the caller checked :func:`applies`."""
    qn, qp = quantizer.bounds()
    out = _InputStepConv2d.apply(x, quantizer.step, w, b, stride, padding, dilation, groups,
                                 qn, qp, quantizer.grad_scale(x))
    meter = flops.current()
    if meter is not None:
        meter.quant_forward(flops.conv_macs(out, w), x, w, custom=True)
    return out
