"""INT8 backward GEMMs for quantized gradients on CUDA (``torch._int_mm``), METHODS.md §4.

On CPU, gradient quantization is *simulated*: ``dY`` is fake-quantized and both backward
GEMMs run in FP32 (``gradq.kernel: simulated``), so it saves no executed FLOPs or time. On
CUDA with ``g_bits <= 8`` a quantized layer whose weight and input activation are quantized
(``<= 8`` bits) can run both GEMMs on integer levels instead (``gradq.kernel: int8``):

* ``dY`` is stochastically rounded to integer levels ``L`` with a scale per tensor, per sample
  or per output channel (the gradq granularity); its input ``X`` and weight ``W`` are already
  on their LSQ grids, so ``round(X / s_a)`` and ``round(W / s_w)`` are their exact levels;
* ``dX = s_g s_w (L @ W_levels)`` and ``dW = s_g s_a (L^T @ X_levels)`` run as int8 x int8 ->
  int32 GEMMs (convs through ``unfold``/``fold``). Levels that do not fit int8 (an asymmetric
  8-bit gradient grid, an unsigned 8-bit activation) are shifted by a per-row/column offset
  whose contribution is added back exactly from row/column sums; the reduction is split so an
  int32 accumulator cannot overflow.

This path needs a GPU and is not exercised by the CPU test suite except for its integer
arithmetic (with ``torch._int_mm`` replaced by an exact integer matmul) and the dispatch
(:func:`int8_available` is False without CUDA). Untested on hardware in this repository.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: (levels, scale, lowest level, highest level) of a stochastically rounded gradient; the
#: scale and bounds broadcast against the levels (per tensor, per row or per column).
LevelsFn = Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]]

INT8_MIN, INT8_MAX = -128, 127
_K_CHUNK = 1 << 16  # 2^16 * 128 * 128 < 2^31: no int32 overflow within a chunk


def int8_available(device: torch.device) -> bool:
    """Whether INT8 gradient GEMMs can run on ``device`` (CUDA with ``torch._int_mm``)."""
    return (device.type == "cuda" and torch.cuda.is_available()
            and hasattr(torch, "_int_mm"))


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, b)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pr, pc = rows - t.shape[0], cols - t.shape[1]
    return F.pad(t, (0, pc, 0, pr)) if pr or pc else t


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices as float32, through ``_int_mm`` (its shape rules:
    more than 16 rows, inner and column sizes multiples of 8), k split into chunks."""
    m, k = a.shape
    n = b.shape[1]
    mp, np_ = max(17, m), _ceil(max(n, 8), 8)
    out = None
    for s in range(0, k, _K_CHUNK):
        e = min(k, s + _K_CHUNK)
        kp = _ceil(max(e - s, 8), 8)
        part = _int_mm(_pad_to(a[:, s:e], mp, kp).contiguous(),
                       _pad_to(b[s:e], kp, np_).contiguous())[:m, :n].float()
        out = part if out is None else out.add_(part)
    return out


def _shift(levels: torch.Tensor, lo: torch.Tensor | int, hi: torch.Tensor | int
           ) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(int8 tensor, offset): ``levels - offset`` fits int8; offset 0 when ``[lo, hi]`` does."""
    if isinstance(lo, int) and isinstance(hi, int) and lo >= INT8_MIN and hi <= INT8_MAX:
        return levels.to(torch.int8), 0
    off = lo - INT8_MIN  # lowest level -> -128; needs hi - lo <= 255 (<= 8 bits)
    return (levels - off).to(torch.int8), off


def offset_matmul(a: torch.Tensor, oa: torch.Tensor | int, b: torch.Tensor,
                  ob: torch.Tensor | int) -> torch.Tensor:
    """``(a + oa) @ (b + ob)`` exactly, for int8 ``a`` [m, k], ``b`` [k, n] and offsets ``oa``
    (scalar or per row, [m, 1]) and ``ob`` (scalar or per column, [1, n])."""
    out = int8_matmul(a, b)
    k = a.shape[1]
    if not (isinstance(oa, int) and oa == 0):
        out += oa * b.sum(0, dtype=torch.int64).float()[None, :]
    if not (isinstance(ob, int) and ob == 0):
        out += a.sum(1, dtype=torch.int64).float()[:, None] * ob
        if not (isinstance(oa, int) and oa == 0):
            out += oa * ob * k
    return out


class Int8GradGemm:
    """``layer.backward.int8``: both backward GEMMs of one quantized layer on int8 levels."""

    def __init__(self, layer, bits: int, granularity: str, levels: LevelsFn,
                 channel_dim: int):
        self.layer = layer
        self.bits = bits
        self.granularity = granularity
        self.levels = levels
        self.channel_dim = channel_dim

    def usable(self, x: torch.Tensor, groups: int = 1) -> bool:
        q = self.layer
        return (x.is_cuda and groups == 1 and self.bits <= 8 and q.w_quant.enabled
                and q.a_quant.enabled and q.w_quant.bits <= 8 and q.a_quant.bits <= 8)

    def _operand_levels(self, t: torch.Tensor, quant) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        s = quant.step.detach().reshape(())
        qn, qp = quant.bounds()
        return (t.detach() * s.reciprocal()).round_(), s, -qn, qp

    def _grad(self, gy: torch.Tensor, keep: int | None):
        return self.levels(gy, keep)

    def linear(self, x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, need_dx: bool,
               need_dw: bool, need_db: bool, channels: torch.Tensor | None):
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gx = gw = gb = None
        tensor = self.granularity == "tensor"
        if need_dx:
            lv, sc, lo, hi = self._grad(g2, None if tensor else 0)
            wl, sw, wlo, whi = self._operand_levels(w, self.layer.w_quant)
            a, oa = _shift(lv, lo if tensor else lo.reshape(-1, 1), hi)
            b, ob = _shift(wl, wlo, whi)
            gx = (offset_matmul(a, oa, b, ob) * (sc.reshape(-1, 1) if not tensor else sc) * sw)
            gx = gx.to(gy.dtype).reshape(*gy.shape[:-1], w.shape[1])
        if need_dw or need_db:
            lv, sc, lo, hi = self._grad(g2, None if tensor else -1)
            gq = lv * sc  # the quantized dY the bias gradient sums (as the simulated path)
            if need_db:
                gb = gq.sum(0).to(gy.dtype)
            if need_dw:
                lt = lv.t()
                sct = sc.reshape(-1, 1) if not tensor else sc
                lot = lo.reshape(-1, 1) if not tensor else lo
                if channels is not None:
                    lt, sct = lt.index_select(0, channels), (sct.index_select(0, channels)
                                                             if not tensor else sct)
                    lot = lot.index_select(0, channels) if not tensor else lot
                xl, sa, xlo, xhi = self._operand_levels(x2, self.layer.a_quant)
                a, oa = _shift(lt, lot, hi)
                b, ob = _shift(xl, xlo, xhi)
                rows = offset_matmul(a, oa, b, ob) * sct * sa
                if channels is None:
                    gw = rows.to(w.dtype)
                else:
                    gw = torch.zeros_like(w).index_copy_(0, channels, rows.to(w.dtype))
        return gx, gw, gb

    def conv(self, x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, stride, padding,
             dilation, need_dx: bool, need_dw: bool, need_db: bool,
             channels: torch.Tensor | None):
        n, cout = gy.shape[0], gy.shape[1]
        kernel = tuple(w.shape[2:])
        tensor = self.granularity == "tensor"
        gx = gw = gb = None
        w2 = w.reshape(cout, -1)
        if need_dx:
            lv, sc, lo, hi = self._grad(gy, None if tensor else 0)  # per sample
            length = lv[0, 0].numel()
            wl, sw, wlo, whi = self._operand_levels(w2, self.layer.w_quant)
            gcols = lv.reshape(n, cout, length).permute(1, 0, 2).reshape(cout, n * length)
            if tensor:
                b, ob = _shift(gcols, lo, hi)
                col_scale = sc
            else:
                ob_col = lo.reshape(n, 1).expand(n, length).reshape(1, -1)
                b, ob = _shift(gcols, ob_col, hi)
                col_scale = sc.reshape(n, 1).expand(n, length).reshape(1, -1)
            a, oa = _shift(wl.t().contiguous(), wlo, whi)
            cols = offset_matmul(a, oa, b, ob) * col_scale * sw  # [Cin*kk, N*L]
            cols = cols.reshape(-1, n, length).permute(1, 0, 2)
            gx = F.fold(cols, tuple(x.shape[2:]), kernel, dilation=dilation, padding=padding,
                        stride=stride).to(gy.dtype)
        if need_dw or need_db:
            lv, sc, lo, hi = self._grad(gy, None if tensor else 1)  # per output channel
            if need_db:
                gb = (lv * sc).sum(dim=(0, 2, 3)).to(gy.dtype)
            if need_dw:
                g2 = lv.permute(1, 0, 2, 3).reshape(cout, -1)
                sct = sc.reshape(-1, 1) if not tensor else sc
                lot = lo.reshape(-1, 1) if not tensor else lo
                if channels is not None:
                    g2 = g2.index_select(0, channels)
                    if not tensor:
                        sct, lot = sct.index_select(0, channels), lot.index_select(0, channels)
                xl, sa, xlo, xhi = self._operand_levels(x, self.layer.a_quant)
                xcol = F.unfold(xl, kernel, dilation=dilation, padding=padding, stride=stride)
                x2 = xcol.permute(0, 2, 1).reshape(-1, xcol.shape[1])  # [N*L, Cin*kk]
                a, oa = _shift(g2, lot, hi)
                # (unfold pads with level 0; the shift moves it to -offset and the offset
                # correction adds it back, so padding stays exactly 0)
                b, ob = _shift(x2, xlo, xhi)
                rows = (offset_matmul(a, oa, b, ob) * sct * sa).reshape(-1, *w.shape[1:])
                if channels is None:
                    gw = rows.to(w.dtype)
                else:
                    gw = torch.zeros_like(w).index_copy_(0, channels, rows.to(w.dtype))
        return gx, gw, gb
