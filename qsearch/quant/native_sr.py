"""The stochastic-rounding gradient quantizer as one native CPU function.

Why: gradient quantization (METHODS.md §4) quantizes one or two gradient tensors per layer
and step. On CPU its compiled form is two ``torch.compile``-d kernels (the grid, then the
rounding), and each compiled call costs 75-90 us of guards and dispatch before any work; this
function does both passes (min/max per grid, then noise and rounding) in one call of a few
microseconds' overhead.

What it computes is :func:`qsearch.quant.fused.sr_quantize_math` on a ``(A, C, B)`` view with
one grid per middle index: the same grid formula (:func:`qsearch.quant.fused.sr_grid`, in
float32, operation for operation), the same counter-hash noise
(:func:`qsearch.quant.fused.hash_uniform`: element ``i`` of the view, two int32 keys), and the
rounding ``clamp(floor(u + g * (1/scale)), qmin, qmax) * scale`` with ``u + g * (1/scale)``
as one fused multiply-add, like the eager ``addcmul`` and the compiled kernel. Given the same
keys the output is bit-identical to the reference (tests/test_native_sr.py). Non-finite
gradients are not propagated into the grid (a NaN element stays NaN; the others are rounded
on the finite elements' grid); a trial stops on a non-finite loss before that matters.

When: float32 on CPU (Linux x86-64 with a C compiler, :mod:`qsearch.quant.native`), fewer than
2^31 elements, native kernels not switched off; one thread, so with several intra-op threads
large gradients take the compiled kernels (:func:`qsearch.quant.native_lsq.preferred`).
"""

from __future__ import annotations

import ctypes

import torch

from qsearch.quant import native, native_lsq

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <float.h>

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

/* U[0, 1) with 24-bit resolution for element i under keys (k1, k2). */
static inline float noise(uint32_t i, uint32_t k1, uint32_t k2) {
    uint32_t x = lowbias32(lowbias32(i * 0x9e3779b9U + k1) ^ k2);
    return (float)((x >> 8) & 0xffffffU) * 0x1p-24f;
}

/* The grid of fused._grid_n from one grid's min and max, in float32, op for op. */
static void grid(float lo, float hi, float n, float* inv, float* scale, float* qmin,
                 float* qmax) {
    lo = lo > 0.0f ? 0.0f : lo;
    hi = hi < 0.0f ? 0.0f : hi;
    float span = hi - lo;
    span = span < FLT_MIN ? FLT_MIN : span;
    float zp = rintf(-lo / span * n);
    if (lo < 0.0f) zp = zp < 1.0f ? 1.0f : zp;
    if (hi > 0.0f) zp = zp < n - 1.0f ? zp : n - 1.0f;
    float d1 = zp < 1.0f ? 1.0f : zp, d2 = n - zp < 1.0f ? 1.0f : n - zp;
    float a = -lo / d1, b = hi / d2;
    float s = a < b ? b : a;
    s = s > 0.0f ? s : 1.0f;
    *scale = s; *inv = 1.0f / s; *qmin = -zp; *qmax = n - zp;
}

static inline float apply(float g, float u, float inv, float s, float lo, float hi) {
    float t = floorf(fmaf(g, inv, u));
    t = t < lo ? lo : t;
    t = t > hi ? hi : t;
    return t * s;
}

/* g viewed as (A, C, B), one grid per c; work holds 6 * C floats. */
void qs_sr_quantize(const float* restrict g, float* restrict out, int64_t A, int64_t C,
                   int64_t B, float n, int32_t key1, int32_t key2, float* restrict work) {
    float *lo = work, *hi = work + C, *inv = work + 2 * C, *sc = work + 3 * C,
          *qmin = work + 4 * C, *qmax = work + 5 * C;
    const uint32_t k1 = (uint32_t)key1, k2 = (uint32_t)key2;
    for (int64_t c = 0; c < C; ++c) { lo[c] = INFINITY; hi[c] = -INFINITY; }
    if (B == 1) {
        for (int64_t a = 0; a < A; ++a) {
            const float* row = g + a * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                float v = row[c];
                lo[c] = v < lo[c] ? v : lo[c];
                hi[c] = v > hi[c] ? v : hi[c];
            }
        }
    } else {
        for (int64_t c = 0; c < C; ++c) {
            float l = INFINITY, h = -INFINITY;
            for (int64_t a = 0; a < A; ++a) {
                const float* p = g + (a * C + c) * B;
                #pragma omp simd reduction(min:l) reduction(max:h)
                for (int64_t b = 0; b < B; ++b) {
                    l = p[b] < l ? p[b] : l;
                    h = p[b] > h ? p[b] : h;
                }
            }
            lo[c] = l; hi[c] = h;
        }
    }
    for (int64_t c = 0; c < C; ++c) grid(lo[c], hi[c], n, &inv[c], &sc[c], &qmin[c], &qmax[c]);
    if (B == 1) {
        for (int64_t a = 0; a < A; ++a) {
            const float* row = g + a * C;
            float* o = out + a * C;
            uint32_t base = (uint32_t)(a * C);
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c)
                o[c] = apply(row[c], noise(base + (uint32_t)c, k1, k2), inv[c], sc[c], qmin[c],
                             qmax[c]);
        }
    } else {
        for (int64_t a = 0; a < A; ++a) {
            for (int64_t c = 0; c < C; ++c) {
                const int64_t off = (a * C + c) * B;
                const float* p = g + off;
                float* o = out + off;
                const float iv = inv[c], s = sc[c], l = qmin[c], h = qmax[c];
                #pragma omp simd
                for (int64_t b = 0; b < B; ++b)
                    o[b] = apply(p[b], noise((uint32_t)(off + b), k1, k2), iv, s, l, h);
            }
        }
    }
}
"""

_P, _N = ctypes.c_void_p, ctypes.c_int64
_LIB = native.NativeLibrary("sr", _SOURCE, {
    "qs_sr_quantize": (None, [_P, _P, _N, _N, _N, ctypes.c_float, ctypes.c_int32,
                                      ctypes.c_int32, _P]),
})


def set_enabled(on: bool) -> None:
    """Allow (the default) or forbid this kernel in this process (A/B timing, tests)."""
    _LIB.enabled = on


def status() -> str:
    """``native`` when the kernel is loaded (building it on first call), else why not."""
    return _LIB.status()


def usable(g: torch.Tensor, compiled_usable: bool) -> bool:
    """Whether gradient ``g`` should be quantized here (``compiled_usable``: whether the
    compiled kernels could take it)."""
    return (g.numel() < 2**31 and native_lsq.preferred(g, compiled_usable)
            and _LIB.load() is not None)


def sr_quantize(g3: torch.Tensor, seeds: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`qsearch.quant.fused.sr_quantize_math` of a contiguous float32 ``(A, C, B)``
    CPU tensor with ``2^bits - 1`` levels and the two int32 keys in ``seeds``."""
    a, c, b = g3.shape
    out = torch.empty_like(g3)
    work = torch.empty(6 * c, dtype=torch.float32)
    k1, k2 = (int(k) for k in seeds.tolist())
    _LIB.load().qs_sr_quantize(g3.data_ptr(), out.data_ptr(), a, c, b, float(2**bits - 1),
                               k1, k2, work.data_ptr())
    return out
