"""A ReLU and the unsigned LSQ quantizer that reads its output, fused: ``relu_quantize``.

Why: in a quantized CNN most activation quantizers read a ReLU's output. Run apart, the pair
costs two elementwise passes forward (ReLU, then LSQ) and, backward, LSQ's straight-through
pass, autograd's sum of the two gradients where the ReLU output also feeds a residual
shortcut, and ReLU's mask: each a full read and write of the activation. That traffic, not
arithmetic, is most of what QAT adds to an FP32 step on CPU. Fused, the forward is one pass
over the ReLU's input writing the ReLU output (only where something else reads it) and the
quantized tensor, and the backward is one pass writing the input gradient and summing the
step gradient. The values are bit-identical to ``F.relu`` then the layer's own quantizer
(``tests/test_relu_lsq.py``; measured in ``benchmarks/bench_trainer.py``).

How a model uses it: where a ReLU output ``r = relu(y)`` feeds a layer, the model calls
``r, x = relu_quantize(y, layer)`` and then ``layer(x)``. When the fused path applies, ``x`` is
already the layer's quantized input and the layer's quantizer passes exactly that tensor
through (:meth:`~qsearch.quant.lsq.LSQQuantizer.forward`); otherwise ``x`` is ``r`` and the
layer quantizes it itself, as without this helper. Module hooks still see every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.quant import fused, native_lsq
from qsearch.quant.lsq import LSQQuantizer
from qsearch.quant.memory_order import flat, memory_order, unflat


class _ReluLSQFunction(torch.autograd.Function):
    """``(relu(y), LSQ(relu(y)))`` (``need_r``) or ``LSQ(relu(y))`` on the native loops
    (:mod:`qsearch.quant.native_lsq`) or else the compiled kernels, in ``y``'s memory layout.
    Saves ``y`` (as a lone ReLU saves its output: the same size)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, s: torch.Tensor, qp: int, g: float, need_r: bool):  # type: ignore[override]
        order = memory_order(y)
        yf = flat(y, order)
        ctx.save_for_backward(y, s)
        ctx.native = None
        if native_lsq.preferred(y, _compiled_usable(y)):
            ctx.native = step = float(s)
            ctx.conf = (0.0, float(qp), g, order, need_r)
            r, q = native_lsq.relu_lsq_forward(yf, step, 0.0, float(qp), need_r)
            if need_r:
                return unflat(r, y, order), unflat(q, y, order)
            return unflat(q, y, order)
        lo, hi = fused.bounds(0, qp, y)
        ctx.conf = (lo, hi, g, order, need_r)
        if need_r:
            r, q = fused.relu_lsq_forward(yf, s, lo, hi)
            return unflat(r, y, order), unflat(q, y, order)
        return unflat(fused.relu_lsq_forward_q(yf, s, lo, hi), y, order)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        y, s = ctx.saved_tensors
        lo, hi, g, order, need_r = ctx.conf
        need_y, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.native is not None:  # the step's float value the forward used
            grad_r = flat(grads[0], order) if need_r else None
            grad_y, sum_s = native_lsq.relu_lsq_backward(
                grad_r, flat(grads[-1], order), flat(y, order), ctx.native, lo, hi)
            return (unflat(grad_y, y, order) if need_y else None,
                    torch.full_like(s, sum_s * g) if need_s else None, None, None, None)
        if need_r:
            grad_r, grad_q = grads
            grad_y, grad_s = fused.run_or_eager(
                fused.relu_lsq_backward, flat(grad_r, order), flat(grad_q, order),
                flat(y, order), s, lo, hi)
        else:
            grad_y, grad_s = fused.run_or_eager(
                fused.relu_lsq_backward_q, flat(grads[0], order), flat(y, order), s, lo, hi)
        return (unflat(grad_y, y, order) if need_y else None,
                grad_s.mul_(g).to(s.dtype) if need_s else None, None, None, None)


def _fusable(y: torch.Tensor, layer: nn.Module) -> LSQQuantizer | None:
    """The layer's activation quantizer when the fused path gives exactly what the layer would
    compute: an enabled, initialised, unsigned LSQ quantizer (a ReLU output is never
    negative, so an undecided sign is decided by the layer's own first call), training with
    gradients, and native loops or compiled kernels available for ``y``."""
    quantizer = getattr(layer, "a_quant", None)
    if not isinstance(quantizer, LSQQuantizer) or not quantizer.enabled:
        return None
    if not layer.training or not quantizer.is_initialized or quantizer.signed:
        return None
    if not torch.is_grad_enabled() or not (y.requires_grad or quantizer.step.requires_grad):
        return None
    if native_lsq.usable(y) or _compiled_usable(y):
        return quantizer
    return None


def _compiled_usable(y: torch.Tensor) -> bool:
    return y.numel() >= fused.LSQ_MIN_NUMEL and fused.relu_lsq_forward.usable(y)


def relu_quantize(y: torch.Tensor, layer: nn.Module, need_relu: bool = True
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(relu(y), input for layer)``: the second is ``layer``'s quantized input, produced with
    the ReLU in one fused kernel, when ``layer`` quantizes its input with an unsigned LSQ
    quantizer (any module whose ``a_quant`` is an :class:`LSQQuantizer` applies it to its
    input first: :class:`~qsearch.quant.layers.QuantLayer`, CSQ's bit-plane layers); else it
    is ``relu(y)`` itself, for the layer to treat as usual. With ``need_relu=False`` (nothing
    else reads the ReLU output) the first may be None."""
    quantizer = _fusable(y, layer)
    if quantizer is not None:
        _, qp = quantizer.bounds()
        try:
            out = _ReluLSQFunction.apply(y, quantizer.step, qp, quantizer.grad_scale(y),
                                         need_relu)
        except fused.CompileFailed:  # e.g. under FlopCounterMode: the unfused pair
            pass
        else:
            r, x = out if need_relu else (None, out)
            quantizer.pass_through_next(x)
            return r, x
    r = F.relu(y)
    return r, r
