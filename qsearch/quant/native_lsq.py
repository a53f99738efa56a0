"""LSQ fake-quantization, and a ReLU fused with it, as native CPU loops.

Why: on CPU the fused quantizers of :mod:`qsearch.quant.fused` are ``torch.compile``-d loops,
and each call of a compiled graph costs 75-90 us of guards and dispatch before any work
(measured: a 1,024-element call 80-92 us, against 5-8 us here). A ResNet-20 step makes about
80 quantizer calls (forward and backward of every weight and activation quantizer), and the
weights' quantizers ran eagerly, as five or six ATen passes each, because a compiled call cost
more than their work. The loops below are also faster on large tensors than inductor's code
(the backward reads each input once while it writes the input gradient and sums the step
gradient). ``benchmarks/bench_trainer.py`` times the whole step both ways (``qsearch-cl``
and ``qsearch-cl-compiled``).

What they compute is exactly the reference in :mod:`qsearch.quant.fused` (``*_math``): the
forward ``round(clamp(v * (1/s), lo, hi)) * s`` and the input gradients are bit-identical
(built with ``-ffp-contract=off``, so no multiply-add is fused that torch does not fuse;
``rintf`` rounds half to even like ``torch.round``; NaN propagates as through
``torch.clamp``). The unscaled step gradient ``sum(grad * d)`` is the same sum in another
order: each product in float32 as in torch, summed in double per vector lane.

When: float32 tensors on CPU, with the library built (Linux x86-64 with a C compiler;
:mod:`qsearch.quant.native`) and native kernels not switched off (``QSEARCH_COMPILE=0``, or
:func:`set_enabled`). A loop runs on the calling thread, so with several intra-op threads a
large tensor goes to the compiled kernels where they are usable (they split it across the
threads), see :func:`preferred`. Splitting these loops across torch's OpenMP threads was
tried and dropped: in a ResNet-20 step on 2 threads the split backward made the step slower
(392-406 ms against 372 ms with the backward on one thread; measured 2026-12-06).
"""

from __future__ import annotations

import ctypes

import torch

from qsearch.quant import native

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* q = round(clamp(v * (1/s), lo, hi)) * s, optionally after a ReLU (r = relu(y) kept when
   r is not NULL). Comparisons are written so that NaN passes through, as in torch.clamp. */
static inline __attribute__((always_inline)) void forward(
        const float* restrict y, float* restrict r, float* restrict q, int64_t n, float s,
        float lo, float hi, const int relu, const int keep_r) {
    const float inv = 1.0f / s;
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        float v = y[i];
        if (relu) v = v < 0.0f ? 0.0f : v;
        if (keep_r) r[i] = v;
        float t = v * inv;
        t = t < lo ? lo : t;
        t = t > hi ? hi : t;
        q[i] = rintf(t) * s;
    }
}

/* Returns sum(gq * d), d = round(v/s) - v/s inside the range and the clamped level outside
   (the unscaled LSQ step gradient); writes the input gradient gy when asked: straight
   through inside the range, then (ReLU) times the mask y > 0, plus gr where given. */
static inline __attribute__((always_inline)) double backward(
        const float* restrict gr, const float* restrict gq, const float* restrict y,
        float* restrict gy, int64_t n, float s, float lo, float hi, const int relu,
        const int has_gr, const int write_gy) {
    const float inv = 1.0f / s;
    double acc = 0.0;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < n; ++i) {
        float g = gq[i], yi = y[i];
        float v = relu ? (yi < 0.0f ? 0.0f : yi) : yi;
        float vs = v * inv;
        float c = vs < lo ? lo : vs;
        c = c > hi ? hi : c;
        float rq = rintf(c);
        int inside = c == vs;
        acc += (double)(g * (inside ? rq - vs : rq));
        if (write_gy) {
            float gv = inside ? g : 0.0f;
            if (relu) {
                float sum = has_gr ? gr[i] + gv : gv;
                gy[i] = yi > 0.0f ? sum : 0.0f;
            } else {
                gy[i] = gv;
            }
        }
    }
    return acc;
}

void qs_lsq_forward(const float* v, float* q, int64_t n, float s, float lo, float hi) {
    forward(v, 0, q, n, s, lo, hi, 0, 0);
}
void qs_relu_lsq_forward(const float* y, float* r, float* q, int64_t n, float s, float lo,
                         float hi) {
    forward(y, r, q, n, s, lo, hi, 1, 1);
}
void qs_relu_lsq_forward_q(const float* y, float* q, int64_t n, float s, float lo, float hi) {
    forward(y, 0, q, n, s, lo, hi, 1, 0);
}
double qs_lsq_backward(const float* g, const float* v, float* gv, int64_t n, float s,
                       float lo, float hi) {
    return backward(0, g, v, gv, n, s, lo, hi, 0, 0, 1);
}
double qs_lsq_backward_s(const float* g, const float* v, int64_t n, float s, float lo,
                         float hi) {
    return backward(0, g, v, 0, n, s, lo, hi, 0, 0, 0);
}
double qs_relu_lsq_backward(const float* gr, const float* gq, const float* y, float* gy,
                            int64_t n, float s, float lo, float hi) {
    return backward(gr, gq, y, gy, n, s, lo, hi, 1, 1, 1);
}
double qs_relu_lsq_backward_q(const float* gq, const float* y, float* gy, int64_t n, float s,
                              float lo, float hi) {
    return backward(0, gq, y, gy, n, s, lo, hi, 1, 0, 1);
}
"""

_P, _N, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
_LIB = native.NativeLibrary("lsq", _SOURCE, {
    "qs_lsq_forward": (None, [_P, _P, _N, _F, _F, _F]),
    "qs_relu_lsq_forward": (None, [_P, _P, _P, _N, _F, _F, _F]),
    "qs_relu_lsq_forward_q": (None, [_P, _P, _N, _F, _F, _F]),
    "qs_lsq_backward": (_D, [_P, _P, _P, _N, _F, _F, _F]),
    "qs_lsq_backward_s": (_D, [_P, _P, _N, _F, _F, _F]),
    "qs_relu_lsq_backward": (_D, [_P, _P, _P, _P, _N, _F, _F, _F]),
    "qs_relu_lsq_backward_q": (_D, [_P, _P, _P, _N, _F, _F, _F]),
})

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def set_enabled(on: bool) -> None:
    """Allow (the default) or forbid these kernels in this process (A/B timing, tests)."""
    _LIB.enabled = on


def status() -> str:
    """``native`` when the kernels are loaded (building them on first call), else why not."""
    return _LIB.status()


def usable(t: torch.Tensor) -> bool:
    """Whether the native loops serve ``t``: a plain float32 CPU tensor with real storage (not
    a fake or functional tensor of a tracer or exporter, which the loops could not read and
    which must record torch ops), library loaded."""
    return (type(t) in _PLAIN and t.device.type == "cpu" and t.dtype == torch.float32
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and _LIB.load() is not None)


#: With several intra-op threads, tensors from this many elements go to the compiled kernels
#: (multi-threaded) when those are usable; smaller ones stay here, where a compiled call's
#: fixed cost outweighs the second thread (131,072 elements on 2 threads: 41-64 us here,
#: 112-151 us compiled).
PARALLEL_MIN_NUMEL = 1 << 18


def preferred(t: torch.Tensor, compiled_usable: bool) -> bool:
    """Whether ``t`` should run on the native loops rather than on the compiled kernels
    (``compiled_usable``: whether the caller could take those for ``t``)."""
    if not usable(t):
        return False
    return (not compiled_usable or torch.get_num_threads() == 1
            or t.numel() < PARALLEL_MIN_NUMEL)


def _run(fn, tensors: list[torch.Tensor | None], n: int, *scalars: float) -> float:
    """``fn`` over the flat float32 ``tensors`` (None: a NULL pointer), on this thread;
    returns the kernel's sum (0.0 for a forward)."""
    ptrs = [None if t is None else t.data_ptr() for t in tensors]
    return fn(*ptrs, n, *scalars) or 0.0


def lsq_forward(v: torch.Tensor, s: float, lo: float, hi: float) -> torch.Tensor:
    """``round(clamp(v / s, lo, hi)) * s`` of a flat float32 tensor."""
    v = v.contiguous()
    q = torch.empty_like(v)
    _run(_LIB.load().qs_lsq_forward, [v, q], v.numel(), s, lo, hi)
    return q


def lsq_backward(grad: torch.Tensor, v: torch.Tensor, s: float, lo: float, hi: float,
                 need_v: bool = True) -> tuple[torch.Tensor | None, float]:
    """(dL/dv or None, unscaled dL/ds) of LSQ over flat ``v`` given ``grad``."""
    grad, v = grad.contiguous(), v.contiguous()
    lib = _LIB.load()
    if not need_v:
        return None, _run(lib.qs_lsq_backward_s, [grad, v], v.numel(), s, lo, hi)
    gv = torch.empty_like(v)
    return gv, _run(lib.qs_lsq_backward, [grad, v, gv], v.numel(), s, lo, hi)


def relu_lsq_forward(y: torch.Tensor, s: float, lo: float, hi: float, need_r: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(relu(y) or None, LSQ(relu(y)))`` of a flat float32 tensor."""
    y = y.contiguous()
    q = torch.empty_like(y)
    lib = _LIB.load()
    if not need_r:
        _run(lib.qs_relu_lsq_forward_q, [y, q], y.numel(), s, lo, hi)
        return None, q
    r = torch.empty_like(y)
    _run(lib.qs_relu_lsq_forward, [y, r, q], y.numel(), s, lo, hi)
    return r, q


def relu_lsq_backward(grad_r: torch.Tensor | None, grad_q: torch.Tensor, y: torch.Tensor,
                      s: float, lo: float, hi: float) -> tuple[torch.Tensor, float]:
    """(dL/dy, unscaled dL/ds) of ``(relu(y), LSQ(relu(y)))``; ``grad_r`` None when only the
    quantized output has a gradient."""
    grad_q, y = grad_q.contiguous(), y.contiguous()
    gy = torch.empty_like(y)
    lib = _LIB.load()
    if grad_r is None:
        return gy, _run(lib.qs_relu_lsq_backward_q, [grad_q, y, gy], y.numel(), s, lo, hi)
    return gy, _run(lib.qs_relu_lsq_backward, [grad_r.contiguous(), grad_q, y, gy],
                    y.numel(), s, lo, hi)
