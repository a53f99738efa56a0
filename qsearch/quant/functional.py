"""Conv/linear with a customisable backward, shared by the methods that change it.

Gradient quantization (§4) rewrites the output gradient ``dY`` before both GEMMs; LTS (§2)
skips the weight-gradient GEMM of frozen output channels. Both are expressed as
:class:`BackwardOptions` on a quantized layer, and one autograd function honours them, so the
two methods compose instead of each wrapping the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qsearch.quant import flops
from qsearch.quant.column_gather import gather_columns
from qsearch.quant.memory_order import NHWC, is_channels_last

GradTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BackwardOptions:
    """How a quantized layer's backward deviates from plain autograd.

    grad_dx / grad_dw: transforms of dY used for the input-gradient and weight-gradient GEMMs
    (e.g. a stochastic-rounding quantizer; per-sample rows vs per-channel columns).
    dw_channels: indices of output channels whose weight gradient is computed; the others
    get exactly zero without paying for their GEMM (None = all channels).
    """

    grad_dx: GradTransform | None = None
    grad_dw: GradTransform | None = None
    dw_channels: torch.Tensor | None = None
    #: INT8 backward GEMMs on CUDA (:class:`qsearch.quant.int8_gemm.Int8GradGemm`), used
    #: instead of grad_dx/grad_dw where it applies; None: fake-quantized FP32 GEMMs.
    int8: Any = None

    @property
    def active(self) -> bool:
        return (self.grad_dx is not None or self.grad_dw is not None
                or self.dw_channels is not None or self.int8 is not None)


def _transformed(opts: BackwardOptions, gy: torch.Tensor, need_dx: bool, need_dw: bool):
    """(dY for the dX GEMM, dY for the dW GEMM), each None when not needed. When grad_dx and
    grad_dw are the same callable (a per-tensor quantizer), dY is transformed once and shared."""
    g_dx = g_dw = None
    if need_dx:
        g_dx = opts.grad_dx(gy) if opts.grad_dx is not None else gy
    if need_dw:
        if g_dx is not None and opts.grad_dw is opts.grad_dx:
            g_dw = g_dx
        else:
            g_dw = opts.grad_dw(gy) if opts.grad_dw is not None else gy
    return g_dx, g_dw


class _CustomConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups, opts: BackwardOptions):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, groups, opts, b is not None)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups, opts, has_bias = ctx.conf
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        gx = gw = gb = None
        need_dw = ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])
        rows = gathered_dw_rows(opts.dw_channels, w, groups, gy)
        _record_backward(gy.numel() * w[0].numel(), ctx.needs_input_grad, rows, w.shape[0])
        if opts.int8 is not None and opts.int8.usable(x, groups):
            gx, gw, gb = opts.int8.conv(
                x, w, gy, stride, padding, dilation, ctx.needs_input_grad[0],
                ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2], opts.dw_channels)
            return gx, gw, gb, None, None, None, None, None
        g_dx, g = _transformed(opts, gy, ctx.needs_input_grad[0], need_dw)
        if g is not None and g_dx is g and rows is None:
            # One dY for all three gradients: a single fused call, as plain autograd makes.
            mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                    has_bias and ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w, [w.shape[0]] if has_bias else None, stride, padding, dilation, False,
                [0, 0], groups, mask,
            )
            if gw is not None:
                gw = _zero_other_rows(gw, opts.dw_channels)
            return gx, gw, gb, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            # aten directly on the saved tensors (torch.nn.grad.conv2d_input passes an expanded
            # dummy input; same kernel, same result).
            gx = torch.ops.aten.convolution_backward(
                g_dx, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            gw = _conv_weight_grad(x, w, g, stride, padding, dilation, groups, opts.dw_channels)
        if has_bias and ctx.needs_input_grad[2]:
            # aten's own bias reduction: bit-identical to plain autograd (g.sum differs in
            # summation order).
            gb = torch.ops.aten.convolution_backward(
                g, x, w, [w.shape[0]], stride, padding, dilation, False, [0, 0], groups,
                [False, False, True],
            )[2]
        return gx, gw, gb, None, None, None, None, None


def _pair(v: Any) -> tuple[int, int]:
    """A conv's int-or-pair argument (stride, padding, dilation) as a pair."""
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


#: Gathered dW rows up to which the swapped form (:func:`_swapped_weight_grad`) is used: on
#: oneDNN (CPU) the direct weight-gradient kernel works in blocks of 16 output channels, so a
#: few rows cost as much as 16, while a conv with few *input* channels is cheap (measured with
#: benchmarks/bench_lts.py; METHODS.md §2). The swap also needs fewer rows than the layer has
#: input channels: the swapped conv's outputs are those channels, and for a 3-channel stem
#: 8 swapped rows were slower than the direct kernel (2.8 vs 2.0 ms, resnet20, batch 128).
SWAP_MAX_ROWS = 8

#: On CPU the swapped form is also used for any row count that is not a multiple of this
#: block: oneDNN's direct dW pays for whole blocks of 16 rows, the swapped form roughly per
#: row. One thread, channels-last, batch 128 (2026-12-06): 24 of 32 rows 4.50 ms swapped vs
#: 5.66 direct (5.89 all 32 rows), 12 of 16 rows 5.14 vs 5.98; at multiples of 16 the two
#: forms are within 3% (16 of 32: 2.97 vs 2.87; 32 and 48 of 64: 3.16 vs 3.25, 4.55 vs 4.54).
DIRECT_DW_BLOCK = 16


def _swappable(w, stride, padding, dilation) -> bool:
    if isinstance(padding, str):
        return False
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    return (all(s == 1 for s in stride) and all(d == 1 for d in dilation)
            and all(0 <= p <= k - 1 for p, k in zip(padding, w.shape[2:])))


def _swapped_weight_grad(x, g, padding, k_size):
    """dW of a stride-1, dilation-1 conv computed as the weight gradient of the swapped conv
    (input ``g``, output gradient ``x``, padding ``k - 1 - p``), flipped and transposed back:
    ``dW[c, i, a, b] = sum_{n,p} g[n, c, p] x[n, i, p + (a, b) - pad]``. Same MACs, the
    few gathered rows become the input channels (cheap for oneDNN, unlike few output rows)."""
    pad = [k - 1 - p for k, p in zip(k_size, _pair(padding))]
    wt = g.new_empty(1).expand(x.shape[1], g.shape[1], *k_size)
    gt = torch.ops.aten.convolution_backward(
        x, g, wt, None, [1, 1], pad, [1, 1], False, [0, 0], 1, [False, True, False],
    )[1]
    return gt.flip(2, 3).transpose(0, 1)


def _gather_channels(g: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``g.index_select(1, channels)``, in ``g``'s layout. A channels-last ``g`` is an
    ``(N*H*W, C)`` matrix in memory: gathering its columns there gives the channels-last result
    directly, 2.6x faster than ``index_select`` on the 4-D tensor (1.2 vs 3.2 ms for half of a
    128x16x32x32 gradient), which also returns NCHW for the next kernel to reorder, and the
    columns of 16-, 32- and 64-channel gradients are picked by a native AVX-512 kernel where
    one is available (:mod:`qsearch.quant.column_gather`, about 3.5x faster again). (A GEMM
    with a 0/1 selection matrix also picks the columns faster than ``index_select``, but its
    multiply-adds would be executed FLOPs: frozen channels would no longer cut the executed dW
    by exactly their share.)"""
    if is_channels_last(g):
        n, c, h, w = g.shape
        rows = gather_columns(g.permute(NHWC).reshape(-1, c), channels)
        return rows.view(n, h, w, -1).permute(0, 3, 1, 2)
    return g.index_select(1, channels)


#: Ungrouped convs with a smaller fan-in (``Cin * kh * kw``) compute their whole weight gradient
#: on CPU even with frozen rows: a dW row then costs less than gathering that row's share of
#: dY, which reads the whole gradient. ResNet-20's stem (3x3x3 = 27), one thread,
#: channels-last, batch 128: dW 0.68 ms in full; gathered, 1.34 ms for half of the rows and
#: 0.88 ms for a tenth (measured 2026-12-05). Its 3x3 convs (fan-in 144 and up) gain.
GATHER_MIN_FAN_IN = 64


def gathered_dw_rows(channels: torch.Tensor | None, w: torch.Tensor, groups: int,
                     g: torch.Tensor) -> torch.Tensor | None:
    """The dW rows a conv's backward computes on their own (``channels``), or None when it
    runs the full weight-gradient GEMM instead and zeroes the frozen rows; the FLOP meter
    counts what this returns, i.e. what really ran. In full: grouped convs other than
    depthwise (no gathered form), and on CPU, where the full GEMM is cheaper, ungrouped convs
    with a fan-in under :data:`GATHER_MIN_FAN_IN` and channels-last depthwise convs, whose
    gathered form (a depthwise conv over gathered input and gradient channels) took 5.2 ms for
    half of a 128x96x16x16 layer's rows against 1.1 ms in full; in NCHW it is the other way
    round (2.2 vs 7.3 ms), and on CUDA ungrouped and depthwise rows are always gathered."""
    if channels is None:
        return None
    depthwise = groups == w.shape[0] and w.shape[1] == 1
    if groups != 1 and not depthwise:
        return None
    if g.device.type != "cpu":
        return channels
    if groups == 1 and w[0].numel() < GATHER_MIN_FAN_IN:
        return None
    if depthwise and is_channels_last(g):
        return None
    return channels


def _zero_other_rows(gw: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """``gw`` with every row not in ``channels`` set to exactly zero (None: all kept)."""
    if channels is None:
        return gw
    keep = torch.zeros(gw.shape[0], dtype=torch.bool, device=gw.device)
    keep[channels] = True
    return gw.masked_fill_(~keep.view(-1, *([1] * (gw.dim() - 1))), 0.0)


def _conv_weight_grad(x, w, g, stride, padding, dilation, groups, channels):
    """dW with only ``channels``' rows computed (the others exactly zero), gathered or in
    full as :func:`gathered_dw_rows` decides; None: all rows."""
    if gathered_dw_rows(channels, w, groups, g) is None:
        full = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups)
        return _zero_other_rows(full, channels)
    return _gathered_weight_grad(x, w, g, stride, padding, dilation, groups, channels)


def _gathered_weight_grad(x, w, g, stride, padding, dilation, groups, channels):
    """dW of an ungrouped or depthwise conv with only ``channels``' rows computed, from the
    gathered rows of ``g`` (the swapped form for a few rows and, on CPU, for row counts off
    oneDNN's 16-row blocks); the other rows are zero."""
    gw = torch.zeros_like(w)
    if channels.numel() == 0:
        return gw
    if groups == 1:
        gs = _gather_channels(g, channels)
        k = channels.numel()
        few = k <= SWAP_MAX_ROWS or (g.device.type == "cpu" and k % DIRECT_DW_BLOCK != 0)
        if few and k < x.shape[1] and _swappable(w, stride, padding, dilation):
            sub = _swapped_weight_grad(x, gs, padding, w.shape[2:])
        else:
            sub = torch.nn.grad.conv2d_weight(
                x, (channels.numel(), *w.shape[1:]), gs, stride, padding, dilation, 1,
            )
    else:  # depthwise: channel c sees input c only
        sub = torch.nn.grad.conv2d_weight(
            x.index_select(1, channels), (channels.numel(), 1, *w.shape[2:]),
            g.index_select(1, channels), stride, padding, dilation, channels.numel(),
        )
    gw.index_copy_(0, channels, sub)
    return gw


class _CustomLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, opts: BackwardOptions):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.conf = (opts, b is not None)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        opts, has_bias = ctx.conf
        gx = gw = gb = None
        need_dw = ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])
        _record_backward(gy.numel() * w.shape[1], ctx.needs_input_grad, opts.dw_channels,
                         w.shape[0])
        if opts.int8 is not None and opts.int8.usable(x):
            return (*opts.int8.linear(x, w, gy, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                      has_bias and ctx.needs_input_grad[2], opts.dw_channels),
                    None)
        g_dx, g = _transformed(opts, gy, ctx.needs_input_grad[0], need_dw)
        if ctx.needs_input_grad[0]:
            gx = g_dx @ w
        if not need_dw:
            return gx, None, None, None
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            ch = opts.dw_channels
            if ch is None:
                gw = g2.t() @ x2
            else:
                gw = torch.zeros_like(w)
                if ch.numel():
                    gw.index_copy_(0, ch, gather_columns(g2, ch).t() @ x2)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


def _record_backward(macs: int, needs: tuple[bool, ...], rows: torch.Tensor | None,
                     out_channels: int) -> None:
    """Tell the active :class:`~qsearch.quant.flops.FlopMeter` which GEMMs this backward runs:
    dX when the input needs a gradient, and when the weight does, the dW rows it computes on
    their own (``rows``; None: the full GEMM, :func:`gathered_dw_rows`)."""
    meter = flops.current()
    if meter is None:
        return
    share = 0.0
    if needs[1]:
        share = flops.dw_rows(rows, out_channels) / out_channels
    meter.quant_backward(macs, bool(needs[0]), share)


def conv2d(x, w, b, stride, padding, dilation, groups, opts: BackwardOptions) -> torch.Tensor:
    if not opts.active:
        out = F.conv2d(x, w, b, stride, padding, dilation, groups)
    else:
        out = _CustomConv2d.apply(x, w, b, stride, padding, dilation, groups, opts)
    meter = flops.current()
    if meter is not None:
        meter.quant_forward(flops.conv_macs(out, w), x, w, custom=opts.active)
    return out


def linear(x, w, b, opts: BackwardOptions) -> torch.Tensor:
    if not opts.active:
        out = F.linear(x, w, b)
    else:
        out = _CustomLinear.apply(x, w, b, opts)
    meter = flops.current()
    if meter is not None:
        meter.quant_forward(flops.linear_macs(out, w), x, w, custom=opts.active)
    return out
