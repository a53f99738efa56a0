"""Fused fake-quantization kernels: LSQ forward/backward, a ReLU with the LSQ quantizer that
reads it, and the stochastic-rounding gradient quantizer as ``torch.compile``-d functions,
with an eager fallback.

Why: the eager quantizers are chains of elementwise passes (LSQ forward: scale, clamp, mask,
round, step derivative, rescale; SR: min/max, grid, noise, scale, floor, clamp, rescale), each
reading and writing a full activation or gradient tensor, and the CPU noise generator alone
costs more than the rest together. Compiled, each becomes one loop over the tensor (plus one
reduction where a min/max or a step gradient is needed), and the SR noise is generated inside
that loop from a counter-based hash (see :func:`hash_uniform`) instead of a full-size
``rand_like``.

On CPU the native loops of :mod:`qsearch.quant.native_lsq` (LSQ, ReLU+LSQ) and
:mod:`qsearch.quant.native_sr` (the SR quantizer) run instead where they can be built: cheaper
to call, and faster. These compiled kernels serve CUDA, CPUs without the native ones, and, with
several intra-op threads, large tensors (the native loops run on one thread). What the kernels
compute is specified by the plain-torch functions here (``*_math``), which are also what gets
compiled and what the native loops are tested against; :mod:`qsearch.quant.lsq` and
:mod:`qsearch.methods.gradq` keep their hand-fused eager implementations for when compilation
is off. The compiled LSQ is
bit-exact against the eager one in its forward and input gradient; the step gradient is the
same dot product summed in another order (float32 round-off). The compiled SR uses other
random numbers than the eager one (hash noise instead of NumPy's), so a draw differs from an
eager draw by at most one quantization level; given the same noise the formulas are
bit-identical (tests/test_fused_quant.py).

Compilation is used when ``torch.compile`` works on the tensor's device: not with
``QSEARCH_COMPILE=0`` (or ``QSEARCH_NO_COMPILE=1``), not on CPU without a C++ compiler, not on
CUDA without Triton, and not inside a trial its trainer judged too small to repay the
compilation (:func:`trial_kernels`). A
kernel whose compilation or call fails is disabled for the rest of the process with one
warning, and the eager path takes over. Shapes are compiled dynamically (``dynamic=True``), so
a new batch size or layer width does not recompile.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import shutil
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from qsearch.config import defaults
from qsearch.quant import native_sr
from qsearch.quant.memory_order import NHWC, is_channels_last

ENV_DISABLE = defaults.NO_COMPILE_ENV


# ----------------------------------------------------------------------------- availability


@functools.cache
def _device_ok(device_type: str) -> bool:
    if not hasattr(torch, "compile"):
        return False
    if device_type == "cpu":
        try:
            from torch._inductor import config as inductor_config

            cxx = inductor_config.cpp.cxx[-1] if isinstance(inductor_config.cpp.cxx, tuple) \
                else inductor_config.cpp.cxx
        except Exception:  # noqa: BLE001 - no inductor: no compilation
            return False
        return any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++") if c)
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


class KernelChoice:
    """Whether the running trial uses the compiled kernels; its trainer sets ``compiled``."""

    def __init__(self) -> None:
        self.compiled = True


_trial: KernelChoice | None = None  # the running trial's choice (None: no trial runs)


@contextlib.contextmanager
def trial_kernels() -> Iterator[KernelChoice]:
    """Scope of one trial: kernels compile only if the yielded choice says so. Outside a
    trial (tests, benchmarks, exports) the compiled kernels run wherever they can. The choice
    is process-wide rather than per thread, because autograd runs CUDA backward passes on its
    own threads; one process trains one trial at a time."""
    global _trial
    before, _trial = _trial, KernelChoice()
    try:
        yield _trial
    finally:
        _trial = before


def compile_enabled(device: torch.device | str = "cpu") -> bool:
    """Whether the fused (compiled) kernels are used for tensors on ``device``."""
    if defaults.compile_kernels() == "off" or (_trial is not None and not _trial.compiled):
        return False
    return _device_ok(torch.device(device).type)


class FusedKernel:
    """``fn`` compiled lazily with ``torch.compile(dynamic=True, fullgraph=True)``.

    Dynamo keeps at most a few graphs per function and silently runs the function eagerly
    beyond that, which for these kernels would be slow; it also specialises sizes 0 and 1 and,
    by default, sizes that happen to be equal ("duck sizing": batch 64 and 64 channels). So each
    kernel keeps one compiled function (with its own code object, hence its own dynamo cache)
    per device, dtypes and pattern of size-1 dimensions, compiles it without duck sizing, and
    gets detached inputs (no view bases for dynamo to guard on): one graph per key, however
    the shapes vary. A failure to compile or run disables the kernel for the process with one
    warning and raises :class:`CompileFailed` for the caller to run its eager path.
    """

    def __init__(self, fn: Callable[..., Any], name: str, options: dict[str, Any] | None = None):
        self.fn = fn
        self.name = name
        self.options = options
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self.broken = False

    def _get(self, key: tuple) -> Callable[..., Any]:
        code = self.fn.__code__.replace(co_name=f"{self.fn.__name__}_{len(self._compiled)}")
        clone = types.FunctionType(code, self.fn.__globals__, code.co_name,
                                   self.fn.__defaults__, self.fn.__closure__)
        compiled = torch.compile(clone, dynamic=True, fullgraph=True, options=self.options)
        self._compiled[key] = compiled
        return compiled

    def __call__(self, *args: Any) -> Any:
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        key = tuple((a.device, a.dtype, tuple(d == 1 for d in a.shape))
                    if isinstance(a, torch.Tensor) else a for a in args)
        fn = self._compiled.get(key)
        try:
            if fn is not None:
                return fn(*args)
            from torch.fx.experimental import _config as fx_config

            fn = self._get(key)
            with fx_config.patch(use_duck_shape=False):
                return fn(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eager
            if "dispatch mode" in str(e):
                # Called under a TorchDispatchMode (e.g. FlopCounterMode), which dynamo does
                # not trace: eager for this call only, so the process keeps its fused kernels
                # (and the same numerics) once the mode is gone.
                raise CompileFailed from e
            self.broken = True
            warnings.warn(f"qsearch: fused kernel {self.name} unavailable, using the eager "
                          f"implementation ({type(e).__name__}: {e})", RuntimeWarning,
                          stacklevel=3)
            raise CompileFailed from e

    def usable(self, t: torch.Tensor) -> bool:
        # Under a TorchScript trace (e.g. the ONNX exporter) the eager ops must be recorded.
        return not self.broken and not torch.jit.is_tracing() and compile_enabled(t.device)

    @property
    def compiled_variants(self) -> int:
        """How many compiled copies this process holds (0: the kernel never compiled)."""
        return len(self._compiled)

    def reset(self) -> None:
        """Forget compiled copies and a previous failure (the next call compiles again)."""
        self._compiled.clear()
        self.broken = False


class CompileFailed(RuntimeError):
    """A fused kernel could not be compiled or run; the caller falls back to eager."""


def run_or_eager(kernel: FusedKernel, *args: Any) -> Any:
    """``kernel(*args)``, or its plain-torch definition run eagerly if that fails (slower,
    same values): for a backward whose forward already took the fused path."""
    if not kernel.broken:
        try:
            return kernel(*args)
        except CompileFailed:
            pass
    return kernel.fn(*args)


_BOUNDS: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def bounds(qn: int, qp: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-Qn, Qp)`` as 0-dim tensors on ``like``'s device and dtype (cached)."""
    key = (qn, qp, like.device, like.dtype)
    b = _BOUNDS.get(key)
    if b is None:
        b = _BOUNDS[key] = (torch.tensor(-qn, dtype=like.dtype, device=like.device),
                            torch.tensor(qp, dtype=like.dtype, device=like.device))
    return b


# ----------------------------------------------------------------------------- LSQ


def lsq_forward_math(v: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor
                     ) -> torch.Tensor:
    """``round(clamp(v / s, qn, qp)) * s`` (v/s as ``v * (1/s)``, like the eager path).
    ``qn``/``qp`` are the bounds as 0-dim tensors (``qn = -Qn``): values, not constants of the
    compiled code, so one kernel serves every bit-width."""
    s0 = s.reshape(())
    return torch.round(torch.clamp(v * torch.reciprocal(s0), qn, qp)) * s0


def lsq_backward_math(grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, qn: torch.Tensor,
                      qp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dv, unscaled dL/ds) of the LSQ quantizer, recomputed from ``v``: straight-through
    inside the range, and ``sum(grad * d)`` with ``d = round(v/s) - v/s`` inside, the clamped
    level outside (multiply by ``g`` for the LSQ step gradient)."""
    s0 = s.reshape(())
    vs = v * torch.reciprocal(s0)
    q = torch.clamp(vs, qn, qp)
    inside = q == vs
    rq = torch.round(q)
    ds = torch.where(inside, rq - vs, rq)
    grad_v = torch.where(inside, grad, torch.zeros_like(grad))
    return grad_v, (grad * ds).sum().reshape(1)


def lsq_backward_s_math(grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, qn: torch.Tensor,
                        qp: torch.Tensor) -> torch.Tensor:
    """Unscaled dL/ds only (a frozen input, e.g. the network's input batch)."""
    s0 = s.reshape(())
    vs = v * torch.reciprocal(s0)
    q = torch.clamp(vs, qn, qp)
    rq = torch.round(q)
    return (grad * torch.where(q == vs, rq - vs, rq)).sum().reshape(1)


def lsq_backward_v_math(grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, qn: torch.Tensor,
                        qp: torch.Tensor) -> torch.Tensor:
    """dL/dv only (a frozen step)."""
    s0 = s.reshape(())
    vs = v * torch.reciprocal(s0)
    return torch.where(torch.clamp(vs, qn, qp) == vs, grad, torch.zeros_like(grad))


def lsq_step_derivative_math(v: torch.Tensor, s: torch.Tensor, qn: torch.Tensor,
                             qp: torch.Tensor) -> torch.Tensor:
    """``d(v_hat)/ds`` per element, unscaled: ``round(v/s) - v/s`` inside the range, the
    clamped level outside (what :func:`lsq_backward_math` multiplies the gradient by)."""
    s0 = s.reshape(())
    vs = v * torch.reciprocal(s0)
    q = torch.clamp(vs, qn, qp)
    rq = torch.round(q)
    return torch.where(q == vs, rq - vs, rq)


#: Below this many elements the eager LSQ is faster than a compiled call (whose dispatch and
#: guards cost ~20-30 us on CPU): most weight tensors.
LSQ_MIN_NUMEL = 1 << 16

lsq_forward = FusedKernel(lsq_forward_math, "lsq_forward")
lsq_backward = FusedKernel(lsq_backward_math, "lsq_backward")
lsq_backward_s = FusedKernel(lsq_backward_s_math, "lsq_backward_s")
lsq_backward_v = FusedKernel(lsq_backward_v_math, "lsq_backward_v")
lsq_step_derivative = FusedKernel(lsq_step_derivative_math, "lsq_step_derivative")


# ----------------------------------------------------------------------------- ReLU + LSQ
#
# A ReLU whose output an unsigned LSQ quantizer reads (``q = LSQ(relu(y))``), as one kernel
# each way (:mod:`qsearch.quant.relu_lsq`). The operations are the reference's, in its order
# (``relu``, then ``* (1/s)``, clamp, round, ``* s``), so the values are bit-identical to
# ``F.relu`` followed by :func:`lsq_forward_math`; the backward gives ``dL/dy`` of the pair
# (ReLU's mask times the sum of the ReLU output's own gradient and the straight-through one)
# and the LSQ step gradient.


def relu_lsq_forward_math(y: torch.Tensor, s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(y), LSQ(relu(y)))``: the ReLU output for its other readers (a residual
    shortcut) and the quantized input of the next layer, written in one pass over ``y``."""
    r = torch.relu(y)
    return r, lsq_forward_math(r, s, qn, qp)


def relu_lsq_forward_q_math(y: torch.Tensor, s: torch.Tensor, qn: torch.Tensor,
                            qp: torch.Tensor) -> torch.Tensor:
    """``LSQ(relu(y))`` alone, when nothing else reads the ReLU output."""
    return lsq_forward_math(torch.relu(y), s, qn, qp)


def relu_lsq_backward_math(grad_r: torch.Tensor, grad_q: torch.Tensor, y: torch.Tensor,
                           s: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dy, unscaled dL/ds) of ``(relu(y), LSQ(relu(y)))`` given the gradients of both
    outputs: ``(grad_r + grad_q * inside) * (y > 0)``, and LSQ's step gradient."""
    grad_v, grad_s = lsq_backward_math(grad_q, torch.relu(y), s, qn, qp)
    return torch.where(y > 0, grad_r + grad_v, torch.zeros_like(grad_r)), grad_s


def relu_lsq_backward_q_math(grad_q: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                             qn: torch.Tensor, qp: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dy, unscaled dL/ds) of ``LSQ(relu(y))``."""
    grad_v, grad_s = lsq_backward_math(grad_q, torch.relu(y), s, qn, qp)
    return torch.where(y > 0, grad_v, torch.zeros_like(grad_v)), grad_s


relu_lsq_forward = FusedKernel(relu_lsq_forward_math, "relu_lsq_forward")
relu_lsq_forward_q = FusedKernel(relu_lsq_forward_q_math, "relu_lsq_forward_q")
relu_lsq_backward = FusedKernel(relu_lsq_backward_math, "relu_lsq_backward")
relu_lsq_backward_q = FusedKernel(relu_lsq_backward_q_math, "relu_lsq_backward_q")


# ----------------------------------------------------------------------------- SR gradients


def sr_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, lowest level, highest level) of an asymmetric ``bits``-bit grid covering
    ``[min(lo, 0), max(hi, 0)]`` with 0 exactly on a level (elementwise over ``lo``/``hi``).

    The zero point is ``round(n * -lo / (hi - lo))`` (``n = 2^b - 1``), kept in ``[1, n-1]``
    when the range has both signs so each sign has at least one level; the scale is then the
    smallest that still reaches both ends, so no value is ever clipped.
    """
    n = float(2**bits - 1)
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    span = (hi - lo).clamp_min(torch.finfo(hi.dtype).tiny)
    zp = (-lo / span * n).round()
    zp = torch.where(lo < 0, zp.clamp_min(1.0), zp)
    zp = torch.where(hi > 0, zp.clamp_max(n - 1.0), zp)
    scale = torch.maximum(-lo / zp.clamp_min(1.0), hi / (n - zp).clamp_min(1.0))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero: any scale works
    return scale, -zp, n - zp


def minmax(g: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``g`` over everything but dimension ``keep`` (None: the whole tensor),
    shaped to broadcast against ``g``."""
    if keep is None:
        return torch.aminmax(g)
    keep = keep % g.dim()
    if keep == 0:
        g2 = g.reshape(g.shape[0], -1)
        shape = [g.shape[0]] + [1] * (g.dim() - 1)
        return g2.amin(dim=1).reshape(shape), g2.amax(dim=1).reshape(shape)
    dims = tuple(d for d in range(g.dim()) if d != keep)
    return g.amin(dim=dims, keepdim=True), g.amax(dim=dims, keepdim=True)


# 32-bit counter hash ("lowbias32", C. Wellons' hash prospector: x ^= x >> 16; x *= M1;
# x ^= x >> 15; x *= M2; x ^= x >> 16), a bijection of 32-bit words with good avalanche. In
# int32 arithmetic: products wrap, and logical shifts are arithmetic shifts with the sign bits
# masked off.
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed 32-bit constant
_GOLDEN = 0x9E3779B9 - (1 << 32)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def hash_uniform(g: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Noise ``U[0, 1)`` shaped like ``g`` (float32, 24-bit resolution like ``torch.rand``)
    from a counter-based generator: element ``i`` gets
    ``h(h(i * golden + k1) ^ k2) >> 8``, ``h`` the lowbias32 hash, ``(k1, k2) = seeds``
    (int32). Two keys make streams of different seeds unrelated rather than shifted copies.
    In a compiled kernel this is a few integer instructions per element; eagerly it is slow
    (many passes), so the eager quantizer draws NumPy noise instead."""
    i = torch.arange(g.numel(), device=g.device, dtype=torch.int32).view(g.shape)
    x = _lowbias32(i * _GOLDEN + seeds[0])
    x = _lowbias32(x ^ seeds[1])
    dtype = torch.promote_types(g.dtype, torch.float32)  # as eager: never fp16/bf16 noise
    return ((x >> 8) & 0xFFFFFF).to(dtype) * (2.0**-24)


def sr_apply(g: torch.Tensor, u: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor,
             qmin: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """``clamp(floor(g / scale + u), qmin, qmax) * scale`` in the eager quantizer's order of
    operations (``u + g * (1/scale)``, ``inv_scale = 1/scale``) in ``u``'s dtype (float32 at
    least), cast back to ``g``'s dtype."""
    out = torch.floor(torch.addcmul(u, g.to(u.dtype), inv_scale.to(u.dtype)))
    return (torch.clamp(out, qmin, qmax) * scale).to(g.dtype)


def sr_grid_math(g3: torch.Tensor, n: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grids of :func:`sr_quantize_math`: ``(1/scale, scale, qmin, qmax)``, each shaped
    ``(1, C, 1)``, from the min/max of ``g3`` (shape ``(A, C, B)``) over A and B."""
    lo = torch.amin(g3, dim=(0, 2), keepdim=True)
    hi = torch.amax(g3, dim=(0, 2), keepdim=True)
    scale, qmin, qmax = _grid_n(lo, hi, n)
    return torch.reciprocal(scale), scale, qmin, qmax


def sr_apply_math(g3: torch.Tensor, seeds: torch.Tensor, inv_scale: torch.Tensor,
                  scale: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """Hash noise and rounding of ``g3`` on the grids :func:`sr_grid_math` computed."""
    return sr_apply(g3, hash_uniform(g3, seeds), inv_scale, scale, qmin, qmax)


def sr_quantize_math(g3: torch.Tensor, seeds: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The whole stochastic-rounding quantizer over ``g3`` of shape ``(A, C, B)`` with one
    grid per index of the middle dimension (min/max over A and B), ``n = 2^bits - 1`` levels
    as a 0-dim tensor: min/max, grid, hash noise, rounding. Every granularity is this one
    computation on a view (:func:`as_3d`), so there are only a few compiled variants."""
    return sr_apply_math(g3, seeds, *sr_grid_math(g3, n))


def _grid_n(lo: torch.Tensor, hi: torch.Tensor, n: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sr_grid` with the level count ``n`` as a tensor (the same operations)."""
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    span = (hi - lo).clamp_min(torch.finfo(hi.dtype).tiny)
    zp = (-lo / span * n).round()
    zp = torch.where(lo < 0, zp.clamp_min(1.0), zp)
    zp = torch.where(hi > 0, torch.minimum(zp, n - 1.0), zp)
    scale = torch.maximum(-lo / zp.clamp_min(1.0), hi / (n - zp).clamp_min(1.0))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, -zp, n - zp


def as_3d(g: torch.Tensor, keep: int | None) -> torch.Tensor:
    """``g`` viewed as ``(A, C, B)`` with the grid dimension ``keep`` in the middle."""
    if keep is None:
        return g.reshape(1, 1, -1)
    keep = keep % g.dim()
    a = 1
    for d in g.shape[:keep]:
        a *= d
    return g.reshape(a, g.shape[keep], -1)


# The quantizer runs as two compiled kernels, not one: compiled as a single graph, inductor
# recomputes the grid (four divisions, a rounding and a dozen min/max) from the reduction's
# outputs inside every vector iteration of the rounding loop, because it cannot prove that
# the loop's stores leave them unchanged. Computing the grid in its own small kernel made the
# quantizer 1.76 -> 1.27 ms (measured) on a 1M-element gradient, one thread, identical values.
sr_grid_kernel = FusedKernel(sr_grid_math, "sr_grid")
# Eager ``addcmul`` is one fused multiply-add (a single rounding), so the compiled kernel may
# contract ``u + g * (1/s)`` the same way to round identically.
sr_apply_kernel = FusedKernel(sr_apply_math, "sr_apply",
                              {"cpp.enable_floating_point_contract_flag": "fast"})


def sr_quantize_fused(g3: torch.Tensor, seeds: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """:func:`sr_quantize_math` on the compiled kernels (raises :class:`CompileFailed`)."""
    return sr_apply_kernel(g3, seeds, *sr_grid_kernel(g3, n))


_LEVELS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def draw_seeds(g: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two int32 keys for :func:`hash_uniform` from ``generator`` or torch's global RNG (on
    CPU; moved to ``g``'s device), so a run is reproducible under its seed and a resumed run
    (the trainer checkpoints the RNG state) continues the stream."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(-(2**31), 2**31, (2,), generator=generator, device=gen_device,
                          dtype=torch.int32)
    return seeds.to(g.device, non_blocking=True)


def sr_quantize(g: torch.Tensor, bits: int, keep: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Fused stochastic-rounding quantizer (the native CPU function of
    :mod:`qsearch.quant.native_sr` where it serves ``g``, else the compiled kernels), or None
    when neither is available for ``g``."""
    compiled_ok = sr_grid_kernel.usable(g) and sr_apply_kernel.usable(g)
    native_ok = native_sr.usable(g, compiled_ok)
    if not (compiled_ok or native_ok):
        return None
    try:
        if (keep is None or keep % 4 in (0, 1)) and is_channels_last(g):
            # A channels-last gradient is quantized in its own memory order (NHWC views, no
            # copy) and comes back channels-last, so the convolutions that consume it do not
            # reorder it. The hash noise follows the element order, so a draw differs from
            # the NCHW tensor's draw; both are unbiased and seeded alike.
            nhwc = g.permute(NHWC)
            out = _sr_3d(_as_3d_nhwc(nhwc, keep), bits, g, generator, native_ok)
            return out.view(nhwc.shape).permute(0, 3, 1, 2)
        return _sr_3d(as_3d(g, keep), bits, g, generator, native_ok).view(g.shape)
    except CompileFailed:
        return None


def _sr_3d(g3: torch.Tensor, bits: int, g: torch.Tensor, generator: torch.Generator | None,
           native_ok: bool) -> torch.Tensor:
    seeds = draw_seeds(g, generator)
    if native_ok:  # the hash indexes elements of the logical (A, C, B) view: any layout
        return native_sr.sr_quantize(g3.contiguous(), seeds, bits)
    key = (bits, g.device, g.dtype)
    n = _LEVELS.get(key)
    if n is None:
        n = _LEVELS[key] = torch.tensor(float(2**bits - 1), device=g.device, dtype=g.dtype)
    return sr_quantize_fused(g3, seeds, n)


def _as_3d_nhwc(nhwc: torch.Tensor, keep: int | None) -> torch.Tensor:
    """:func:`as_3d` of an NCHW tensor given as its contiguous NHWC permutation, as a view:
    the whole tensor, one grid per sample (``keep=0``, each sample's block is contiguous) or
    per channel (``keep=1``, channels are innermost)."""
    if keep is None:
        return nhwc.reshape(1, 1, -1)
    if keep % 4 == 0:
        return nhwc.reshape(1, nhwc.shape[0], -1)
    return nhwc.reshape(-1, nhwc.shape[3], 1)
