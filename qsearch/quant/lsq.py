"""LSQ fake-quantizers (Esser et al., ICLR 2020), exactly as METHODS.md §1.

One autograd function does the forward ``round(clamp(v/s, -Qn, Qp)) * s`` and the backward
(straight-through inside the range; step-size gradient ``round(v/s) - v/s`` inside, ``-Qn``
below, ``Qp`` above, scaled by ``g = 1/sqrt(N*Qp)``). The elementwise passes over activation
tensors are what QAT adds to a training step, so the function keeps them few: the forward,
which computes the rounding anyway, also writes the in-range mask and the per-element step
derivative, and the backward is one multiply and one dot product (measured in
benchmarks/bench_trainer.py). The naive "grad_scale + round_pass" autograd formulation costs
about twice as many passes and sums the step gradient from two large, cancelling terms.

On CPU the forward and the backward are each one native C loop
(:mod:`qsearch.quant.native_lsq`), weights included (with several threads, large tensors
take the compiled kernels, which split them across the threads). Elsewhere, where
``torch.compile`` works (see :mod:`qsearch.quant.fused`), they are each one compiled loop for
large tensors: the forward writes only the output, and the backward
recomputes the mask and the step derivative from the saved input (which the preceding ReLU
or the weight parameter keeps alive anyway) while it writes the input gradient and sums the
step gradient. Same values as the eager function (the step gradient up to float32 summation
order), fewer passes, and no mask or derivative tensors kept between forward and backward.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from qsearch.quant import fused, native_lsq
from qsearch.quant.memory_order import flat, memory_order, unflat


def level_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of a b-bit grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float):  # type: ignore[override]
        # Multiply by the reciprocal like torch.fake_quantize_per_tensor_affine does, so the
        # forward matches it bit for bit at the same scale. A 0-dim step is a CPU "scalar"
        # operand (a faster kernel than broadcasting a 1-element tensor).
        s0 = s.reshape(())
        vs = v * s0.reciprocal()
        q = vs.clamp(-qn, qp)
        need_v, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mask = ds = None
        if need_v or need_s:
            # In range <=> clamping changed nothing. A float mask multiplies fastest on CPU;
            # on accelerators the bool mask is 4x smaller to keep for the backward.
            dtype = v.dtype if v.device.type == "cpu" else torch.bool
            mask = torch.eq(q, vs, out=torch.empty_like(vs, dtype=dtype))
        q.round_()
        if need_s:
            # d(v_hat/s) / ds: round(v/s) - v/s inside; the clamped level (-Qn or Qp) outside.
            # Written over v/s, which is not needed any more.
            ds = torch.addcmul(q, vs, mask, value=-1, out=vs)
        ctx.save_for_backward(mask if need_v else None, ds)
        ctx.g = g
        return q.mul_(s0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        mask, ds = ctx.saved_tensors
        grad_v = grad * mask if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            order = memory_order(ds)  # flat views in memory order (no copy when channels-last)
            grad_s = torch.dot(flat(grad, order), flat(ds, order)).mul_(ctx.g).reshape(1)
        return grad_v, grad_s, None, None, None


class _LSQFusedFunction(torch.autograd.Function):
    """:class:`_LSQFunction` on the compiled kernels of :mod:`qsearch.quant.fused`. The output
    and input gradient keep the input's memory layout (a channels-last activation stays
    channels-last, so the next conv does not reorder it)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float):  # type: ignore[override]
        lo, hi = fused.bounds(qn, qp, v)
        order = memory_order(v)
        out = unflat(fused.lsq_forward(flat(v, order), s, lo, hi), v, order)
        ctx.save_for_backward(v, s)
        ctx.conf = (lo, hi, g, order)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        v, s = ctx.saved_tensors
        lo, hi, g, order = ctx.conf
        need_v, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (flat(grad, order), flat(v, order), s, lo, hi)
        grad_v = grad_s = None
        if need_v and need_s:
            grad_v, grad_s = fused.run_or_eager(fused.lsq_backward, *args)
        elif need_v:
            grad_v = fused.run_or_eager(fused.lsq_backward_v, *args)
        elif need_s:
            grad_s = fused.run_or_eager(fused.lsq_backward_s, *args)
        if grad_v is not None:
            grad_v = unflat(grad_v, v, order)
        if grad_s is not None:
            grad_s = grad_s.mul_(g).to(s.dtype)
        return grad_v, grad_s, None, None, None


class _LSQNativeFunction(torch.autograd.Function):
    """:class:`_LSQFunction` on the native CPU loops of :mod:`qsearch.quant.native_lsq` (any
    size: a call costs a few microseconds), keeping the input's memory layout."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float):  # type: ignore[override]
        order = memory_order(v)
        step = float(s)
        ctx.save_for_backward(v)
        ctx.conf = (step, float(-qn), float(qp), g, order, (s.shape, s.dtype))
        return unflat(native_lsq.lsq_forward(flat(v, order), step, -qn, qp), v, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        step, lo, hi, g, order, (s_shape, s_dtype) = ctx.conf
        need_v, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_v, sum_s = native_lsq.lsq_backward(flat(grad, order), flat(v, order), step, lo,
                                                hi, need_v)
        return (unflat(grad_v, v, order) if need_v else None,
                torch.full(s_shape, sum_s * g, dtype=s_dtype) if need_s else None,
                None, None, None)


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """Functional LSQ fake quantization with the LSQ gradients: on the native CPU loops where
    they serve ``v``, else the compiled kernels (large tensors), else eagerly."""
    # Small tensors (most weights) are not compiled: a compiled call costs more than their
    # eager passes (and much more than a native loop).
    use_fused = v.numel() >= fused.LSQ_MIN_NUMEL and fused.lsq_forward.usable(v)
    order = memory_order(v)
    if s.device.type == "cpu" and order is not None and native_lsq.preferred(v, use_fused):
        if torch.is_grad_enabled() and (v.requires_grad or s.requires_grad):
            return _LSQNativeFunction.apply(v, s, qn, qp, g)
        return unflat(native_lsq.lsq_forward(flat(v, order), float(s), -qn, qp), v, order)
    if torch.is_grad_enabled() and (v.requires_grad or s.requires_grad):
        if use_fused:
            try:
                return _LSQFusedFunction.apply(v, s, qn, qp, g)
            except fused.CompileFailed:
                pass
        return _LSQFunction.apply(v, s, qn, qp, g)
    if use_fused:
        try:
            with torch.no_grad():
                lo, hi = fused.bounds(qn, qp, v)
                order = memory_order(v)
                return unflat(fused.lsq_forward(flat(v, order), s.detach(), lo, hi), v,
                               order)
        except fused.CompileFailed:
            pass
    # Inference (evaluation, level counting): the same values, nothing kept for a backward.
    s0 = s.detach().reshape(())
    return (v * s0.reciprocal()).clamp_(-qn, qp).round_().mul_(s0)


class LSQQuantizer(nn.Module):
    """A per-tensor LSQ quantizer with a learned step size.

    ``bits == 32`` means off (identity). ``signed=None`` (activations only) decides the sign
    from the first batch: an input that can be negative (the first layer, a linear bottleneck)
    gets a signed grid, a post-ReLU input an unsigned one. Bits, sign and whether the step was
    initialised are buffers, so ``state_dict`` round-trips the quantizer exactly. The forward
    reads Python mirrors of those buffers instead: reading a CUDA buffer synchronises the
    device, several times per layer and step. The mirrors are refreshed whenever the buffers
    change here or are loaded from a state dict; do not write the buffers from outside.
    """

    def __init__(self, bits: int, kind: str, signed: bool | None = None):
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
        self.kind = kind
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("bits_buf", torch.tensor(int(bits)))
        sign = -1 if signed is None else int(signed)
        self.register_buffer("signed_buf", torch.tensor(1 if kind == "weight" else sign))
        self.register_buffer("initialized", torch.tensor(False))
        self._mirror_buffers()

    #: The tensor :func:`~qsearch.quant.relu_lsq.relu_quantize` quantized for this quantizer
    #: (a weak reference, so it never keeps an activation alive).
    _pass_through: weakref.ref | None = None

    def _mirror_buffers(self) -> None:
        self._bits = int(self.bits_buf)
        self._sign = int(self.signed_buf)
        self._initialized = bool(self.initialized)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_pass_through", None)  # a weak reference does not pickle
        return state

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._mirror_buffers()

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def enabled(self) -> bool:
        return self._bits < 32

    @property
    def signed(self) -> bool:
        return self._sign == 1

    @property
    def is_initialized(self) -> bool:
        """Whether the step has been initialised (activations: by the first training batch)."""
        return self._initialized

    def pass_through_next(self, quantized: torch.Tensor) -> None:
        """Let the next call with exactly this tensor return it unchanged: it is already this
        quantizer's output, computed by a fused kernel together with the ReLU before it
        (:mod:`qsearch.quant.relu_lsq`). Any other tensor is quantized as usual."""
        self._pass_through = weakref.ref(quantized)

    def set_bits(self, bits: int) -> None:
        self.bits_buf.fill_(int(bits))
        self.initialized.fill_(False)
        self._mirror_buffers()

    def bounds(self) -> tuple[int, int]:
        return level_bounds(self.bits, self.signed)

    @torch.no_grad()
    def init_step(self, v: torch.Tensor) -> None:
        """s = 2 * mean(|v|) / sqrt(Qp) (METHODS.md §1)."""
        if self._sign == -1:
            self.signed_buf.fill_(1 if bool((v < 0).any()) else 0)
            self._sign = int(self.signed_buf)
        _, qp = self.bounds()
        s = 2 * v.detach().abs().mean() / math.sqrt(qp)
        self.step.data.fill_(max(float(s), 1e-8))
        self.initialized.fill_(True)
        self._initialized = True

    def grad_scale(self, v: torch.Tensor) -> float:
        _, qp = self.bounds()
        n = v.numel() if self.kind == "weight" else v[0].numel()
        return 1.0 / math.sqrt(n * qp)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self._pass_through is not None:
            done, self._pass_through = self._pass_through(), None
            if done is v:
                return v
        if not self.enabled:
            return v
        if self.training and not self._initialized:
            self.init_step(v)  # activations: from the first training batch
        qn, qp = self.bounds()
        return lsq_quantize(v, self.step, qn, qp, self.grad_scale(v))

    @torch.no_grad()
    def levels(self, v: torch.Tensor) -> torch.Tensor:
        """Integer levels round(clamp(v/s)) of ``v`` (what LTS and TR count)."""
        qn, qp = self.bounds()
        return (v * self.step.reciprocal()).clamp_(-qn, qp).round_()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}"
