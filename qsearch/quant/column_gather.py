"""Gather columns of a float32 matrix: ``m.index_select(1, idx)``, with a native CPU kernel.

Why: LTS computes the weight gradient of only the unfrozen output channels, and in the
channels-last layout the trainer uses on CPU those channels are columns of the ``(N*H*W, C)``
output-gradient matrix. ``index_select`` along the last dimension copies them one element at a
time and runs at half the speed of a plain copy of the whole matrix; at 50% of ResNet-20's
channels frozen that gather was 7.5-8.4 ms of a ~250 ms backward. For rows of 16, 32 or 64
floats an AVX-512 CPU permutes a whole row in one or two instructions: the kernel below loads
a row into vector registers, permutes the picked columns into place and stores them. On one
thread it is 3.4-3.8x faster than ``index_select`` (half the columns of ResNet-20's
output-gradient matrices at batch 128: 0.17 vs 0.61 ms for 16 channels, 0.08 vs 0.30 for 32,
0.04 vs 0.15 for 64; ``benchmarks/bench_lts.py --gather-only``), which saves about 4 ms of
such a backward at 50% frozen: a gain inside that benchmark's run-to-run noise
(docs/BENCHMARKS.md), not a change of its conclusion.

When: Linux on an x86-64 CPU with AVX-512 and a C compiler; float32, contiguous, 16/32/64
columns; compiled kernels not switched off (``QSEARCH_COMPILE=0``). The kernel runs on one
thread; so did ``index_select`` on these matrices (0.62 ms with one intra-op thread or two).
Everything else, and any failure to build or load the kernel (one warning, then never
again in the process), runs ``index_select``. The values are the same either way: it copies
floats, it computes nothing.

How: the C source is compiled once per machine and loaded with ``ctypes``
(:mod:`qsearch.quant.native`).
"""

from __future__ import annotations

import ctypes

import torch

from qsearch.quant import native

#: Row widths the kernel handles (one, two or four AVX-512 registers per row).
WIDTHS = (16, 32, 64)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));

/* Picks of output block b (16 columns) as permutation masks: m[b] indexes the register pair
   (v0, v1) or (v2, v3), hi[b] is all ones where the pick lies in (v2, v3). */
static void masks(const int64_t* idx, int64_t k, vi* m, vi* hi) {
    int32_t tmp[64] = {0};
    for (int64_t j = 0; j < k; ++j) tmp[j] = (int32_t)idx[j];
    for (int64_t b = 0; b < (k + 15) / 16; ++b) {
        memcpy(&m[b], tmp + 16 * b, 64);
        hi[b] = (m[b] & 32) != 0;
        m[b] &= 31;
    }
}

/* One row: its picks into out (room for a whole number of 16-float blocks). */
static inline void row(const float* s, int64_t c, int64_t nb, const vi* m, const vi* hi,
                       float* out) {
    vf v0 = *(const vf*)s;
    if (c == 16) {
        for (int64_t b = 0; b < nb; ++b) *(vf*)(out + 16 * b) = __builtin_shuffle(v0, m[b]);
        return;
    }
    vf v1 = *(const vf*)(s + 16);
    if (c == 32) {
        for (int64_t b = 0; b < nb; ++b)
            *(vf*)(out + 16 * b) = __builtin_shuffle(v0, v1, m[b]);
        return;
    }
    vf v2 = *(const vf*)(s + 32), v3 = *(const vf*)(s + 48);
    for (int64_t b = 0; b < nb; ++b) {
        vi lo = (vi)__builtin_shuffle(v0, v1, m[b]), up = (vi)__builtin_shuffle(v2, v3, m[b]);
        *(vi*)(out + 16 * b) = (up & hi[b]) | (lo & ~hi[b]);
    }
}
#endif

int qsearch_gather_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* dst[r, j] = src[r, idx[j]] for r < rows, j < k; src has c columns (16, 32 or 64), each
   idx[j] in [0, c). Returns 0, or -1 when it cannot (no AVX-512, another width). */
int qsearch_gather_columns(const float* restrict src, float* restrict dst, int64_t rows,
                           int64_t c, const int64_t* restrict idx, int64_t k) {
#if defined(__AVX512F__)
    if (!(c == 16 || c == 32 || c == 64) || k < 1 || k > c) return -1;
    vi m[4], hi[4];
    masks(idx, k, m, hi);
    int64_t nb = (k + 15) / 16;
    /* Whole 16-float blocks are stored; the next row overwrites what spills past a row's k
       floats. Rows whose blocks would reach past the end of dst go through a buffer. */
    for (int64_t r = 0; r < rows; ++r) {
        float* d = dst + r * k;
        if (r * k + 16 * nb <= rows * k) {
            row(src + r * c, c, nb, m, hi, d);
        } else {
            float buf[64];
            row(src + r * c, c, nb, m, hi, buf);
            memcpy(d, buf, (size_t)k * sizeof(float));
        }
    }
    return 0;
#else
    (void)src; (void)dst; (void)rows; (void)c; (void)idx; (void)k;
    return -1;
#endif
}
"""

_LIB = native.NativeLibrary(
    "column_gather", _SOURCE,
    {"qsearch_gather_columns": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_int64, ctypes.c_int64,
                                               ctypes.c_void_p, ctypes.c_int64]),
     "qsearch_gather_available": (ctypes.c_int, [])},
    needs=("avx512f",))


def set_enabled(on: bool) -> None:
    """Allow (the default) or forbid the native kernel in this process; for benchmarks that
    time both paths side by side."""
    _LIB.enabled = on


def native_kernel() -> ctypes.CDLL | None:
    """The kernel, built and loaded on first call; None where it cannot be (see
    :func:`status`)."""
    lib = _LIB.load()
    return lib if lib is not None and lib.qsearch_gather_available() == 1 else None


def status() -> str:
    """``native`` when the kernel is loaded (building it on first call), else why not."""
    return _LIB.status()


def _usable(m: torch.Tensor, idx: torch.Tensor) -> bool:
    return (m.device.type == "cpu" and m.dtype == torch.float32 and m.dim() == 2
            and m.shape[1] in WIDTHS and m.is_contiguous() and idx.dim() == 1
            and idx.dtype == torch.int64 and idx.device.type == "cpu" and idx.is_contiguous()
            and 0 < idx.numel() <= m.shape[1] and m.shape[0] > 0
            and not (m.requires_grad and torch.is_grad_enabled()))  # no autograd record


def gather_columns(m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``m.index_select(1, idx)``, on the native kernel where it applies. The indices must
    be in range: ``index_select`` raises on one that is not, the kernel (which reads only
    the row's own floats) takes it modulo 32 instead, so the caller validates them (LTS's
    channel lists are built from the layer's own channels)."""
    if _usable(m, idx):
        lib = native_kernel()
        if lib is not None:
            out = m.new_empty((m.shape[0], idx.numel()))
            rc = lib.qsearch_gather_columns(m.data_ptr(), out.data_ptr(), m.shape[0],
                                            m.shape[1], idx.data_ptr(), idx.numel())
            if rc == 0:
                return out
    return m.index_select(1, idx)
