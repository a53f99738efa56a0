"""Low-bit gradients in the backward pass, with hypernetwork compensation (METHODS.md §4).

Every quantized conv/linear quantizes its output gradient ``dY`` to ``b_g`` bits with
stochastic rounding and uses the result for both backward GEMMs (``dX`` and ``dW``), through
the shared custom backward of :mod:`qsearch.quant.functional` (``layer.backward.grad_dx`` /
``grad_dw``). Granularity ``tensor`` uses one grid per gradient tensor (quantized once, shared
by both GEMMs); ``sample/channel`` uses one grid per sample (row) on the dX path and one per
output channel (column) on the dW path, as in Chen et al. (NeurIPS 2020). The first and last
quantized layers use ``first_last_bits`` (8 by default; 32 keeps them FP32).

The quantizer is asymmetric min-max with zero on a level: for a range ``[lo, hi]`` (widened to
contain 0) it picks an integer zero point and a scale so that the grid covers the whole range.
Because nothing is ever clipped, stochastic rounding ``floor(g/s + U)``, ``U ~ U[0, 1)``, is
exactly unbiased, and an exact zero (dead ReLU, max-pool) stays exactly zero. The noise is
driven by torch's global RNG on the tensor's device (see :func:`uniform_noise`), so a run is
deterministic under its seed and a resumed run continues the stream (the trainer checkpoints
the RNG state).

Hypernetwork compensation is our reconstruction of MetaGrad (its internals are not public)
with MetaQuant's mechanism (Chen, Wang, Pan, NeurIPS 2019). Per quantized-gradient layer, a
coordinate-wise MLP ``H: 1 -> h -> 1`` maps the layer's last (quantized-backward) weight
gradient ``G_prev`` to a weight update ``-lr * H(G_prev)`` on top of the optimizer's own step.
That update is applied and kept: the next training forward uses
``W_meta = W - lr * H(G_prev)`` with ``H`` in the graph, and once that step's backward has run
``W_meta`` is committed to the weights (``W <- W_meta``, before the optimizer steps on the
gradient taken at ``W_meta``). So the loss after the update trains ``H`` (one-step meta
gradient, ``dL/dphi = -lr * (dL/dW_meta) . dH/dphi``), with its own Adam. ``H`` is made
scale-free and zero-preserving: ``H(g) = rms(g) * (m(g/rms(g)) - m(0))``, with ``m``'s output
layer initialised to zero, so training starts exactly as plain QAT and a zero gradient (an
LTS-frozen weight) gets no update. Evaluation and export use the committed ``W``; only the
update from the very last gradient of a run (or epoch) is still pending at evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from qsearch.errors import ConfigError
from qsearch.methods.gradq_config import GradQConfig
from qsearch.methods.plugin import Method
from qsearch.quant import fused

if TYPE_CHECKING:
    from qsearch.quant import QuantLayer
    from qsearch.config import TrialConfig
    from qsearch.methods.plugin import TrainContext

FP32_BITS = 32
Transform = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- quantizer


# The grid and the min/max live with the fused kernel, which compiles the same functions.
sr_grid = fused.sr_grid
_minmax = fused.minmax


def uniform_noise(g: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise ``U ~ U[0, 1)`` shaped like ``g`` (float32 at least), driven by ``generator`` or
    torch's global RNG on ``g``'s device.

    CUDA: ``torch.rand``. CPU: torch's Mersenne-Twister costs ~7.6 ns per float, more than
    the rest of the quantizer together; so one 62-bit seed is drawn from torch's RNG and
    NumPy's SFC64 generator (~3.3 ns per float, same 24-bit float resolution) makes the noise.
    Seeded from torch's stream, a run stays deterministic under its seed and a resumed run
    (the trainer checkpoints torch's RNG state) draws the same noise.
    """
    dtype = torch.promote_types(g.dtype, torch.float32)  # fp16/bf16 noise would be too coarse
    if g.device.type != "cpu":
        return torch.rand(g.shape, generator=generator, device=g.device, dtype=dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    u = np.random.Generator(np.random.SFC64(seed)).random(g.numel(), dtype=np_dtype)
    return torch.from_numpy(u).view(g.shape).to(dtype)


def sr_quantize(g: torch.Tensor, bits: int, keep: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastically rounded ``bits``-bit fake quantization of ``g`` (unbiased: E[Q(g)] = g).

    ``keep=None`` uses one grid for the tensor; ``keep=d`` one grid per index of dimension
    ``d`` (0: per sample; the channel dimension: per output channel). ``bits >= 32`` returns
    ``g``. The noise comes from ``generator`` or else torch's global RNG on ``g``'s device.
    """
    if bits >= FP32_BITS:
        return g
    out = fused.sr_quantize(g, bits, keep, generator)
    if out is not None:  # one compiled loop, noise generated inside it
        return out
    lo, hi = _minmax(g, keep)
    scale, qmin, qmax = sr_grid(lo, hi, bits)
    out = uniform_noise(g, generator)
    out.addcmul_(g, scale.reciprocal()).floor_()
    # Clamp only guards against float round-off at the range ends (the grid covers [lo, hi]).
    return out.clamp_(qmin, qmax).mul_(scale).to(g.dtype)


def grad_transforms(bits: int, granularity: str, channel_dim: int) -> tuple[Transform, Transform]:
    """(grad_dx, grad_dw) for :class:`~qsearch.quant.functional.BackwardOptions`.

    With ``tensor`` granularity both are the same object, which tells the custom backward to
    quantize ``dY`` once and feed the same tensor to both GEMMs.
    """
    if granularity == "tensor":
        def per_tensor(g: torch.Tensor) -> torch.Tensor:
            return sr_quantize(g, bits)

        return per_tensor, per_tensor

    def per_sample(g: torch.Tensor) -> torch.Tensor:
        return sr_quantize(g, bits, keep=0)

    def per_channel(g: torch.Tensor) -> torch.Tensor:
        return sr_quantize(g, bits, keep=channel_dim)

    return per_sample, per_channel


# ----------------------------------------------------------------------------- kernels


def choose_kernel(device: torch.device, bits: int) -> str:
    """How quantized gradients execute on ``device``: ``int8`` (CUDA, ``bits <= 8``: both
    backward GEMMs on int8 levels through ``torch._int_mm``, :mod:`qsearch.quant.int8_gemm`)
    or ``simulated`` (everywhere else: ``dY`` is fake-quantized and the GEMMs run in FP32, so
    quantized gradients cost FP32 FLOPs and time)."""
    from qsearch.quant.int8_gemm import int8_available

    if bits <= 8 and int8_available(device):
        return "int8"
    return "simulated"


def sr_levels(g: torch.Tensor, bits: int, keep: int | None = None):
    """(levels, scale, lowest level, highest level) of the stochastically rounded ``g``: the
    integer form of :func:`sr_quantize`'s eager path (same grid, same unbiased rounding), for
    the INT8 GEMMs."""
    lo, hi = _minmax(g, keep)
    scale, qmin, qmax = sr_grid(lo, hi, bits)
    lv = uniform_noise(g).addcmul_(g, scale.reciprocal()).floor_().clamp_(qmin, qmax)
    return lv, scale, qmin, qmax


# ----------------------------------------------------------------------------- hypernetwork


class Hypernet(nn.Module):
    """Coordinate-wise MLP ``1 -> hidden -> 1`` shared by all elements of one layer's weight.

    ``forward(g) = rms(g) * (m(g/rms(g)) - m(0))``: normalising by the (detached) RMS makes
    it independent of the gradient's scale, subtracting ``m(0)`` maps a zero gradient to a
    zero correction, and the zero-initialised output layer makes ``H = 0`` at the start.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, 1, bias=False)  # a bias would cancel in m(x) - m(0)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        g = g.detach()
        rms = g.pow(2).mean().sqrt().clamp_min(1e-30)
        x = torch.cat([(g / rms).reshape(-1, 1), g.new_zeros(1, 1)])
        m = self.fc2(torch.tanh(self.fc1(x)))
        out = ((m[:-1] - m[-1]) * rms).reshape(g.shape)
        # m(0) - m(0) is 0 only up to GEMM round-off (rows may take different kernel paths):
        # a zero gradient gets exactly zero.
        return out.masked_fill(g == 0, 0.0)


class _MetaWeight:
    """``layer.weight_transform``: ``W -> W - lr * H(G_prev)`` while training, else ``W``.

    The update ``lr * H(G_prev)`` (detached) is kept in ``method.pending`` so that
    :meth:`GradQ.after_backward` commits exactly the weights this forward used."""

    def __init__(self, method: GradQ, name: str, layer: QuantLayer):
        self.method, self.name, self.layer = method, name, layer

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        g = self.method.g_prev.get(self.name)
        if g is None or not self.layer.training:
            return w
        corr = self.method.hyper[self.method.hyper_index[self.name]](g)
        delta = self.method.lrs.get(self.name, 0.0) * corr
        with torch.no_grad():
            self.method.corr_ratio[self.name] = corr.norm() / g.norm().clamp_min(1e-30)
        self.method.pending[self.name] = delta.detach()
        return w - delta


# ----------------------------------------------------------------------------- the method


class GradQ(Method):
    """Quantized output gradients in every quantized layer, plus optional hypernetwork."""

    config: GradQConfig

    def __init__(self, config: GradQConfig):
        super().__init__(config)
        self.bits: dict[str, int] = {}
        self.layers: dict[str, QuantLayer] = {}
        self.hyper = nn.ModuleList()
        self.hyper_index: dict[str, int] = {}
        self.hyper_opt: torch.optim.Optimizer | None = None
        self.g_prev: dict[str, torch.Tensor] = {}
        self.lrs: dict[str, float] = {}
        self.corr_ratio: dict[str, torch.Tensor] = {}
        #: The meta update ``lr * H(G_prev)`` the current step's forward used, per layer,
        #: committed to the weights in ``after_backward``.
        self.pending: dict[str, torch.Tensor] = {}
        #: Norm of the last committed meta update and of the optimizer's last step, per layer.
        self.meta_norm: dict[str, torch.Tensor] = {}
        self.step_norm: dict[str, torch.Tensor] = {}
        self._before_step: dict[str, torch.Tensor] = {}
        self.kernel = "simulated"
        self.int8_layers = 0

    # -- set-up ------------------------------------------------------------------------
    def attach(self, ctx: TrainContext) -> None:
        from qsearch.quant import QConv2d

        cfg = self.config
        names = list(ctx.qlayers)
        for i, (name, q) in enumerate(ctx.qlayers.items()):
            edge = i == 0 or i == len(names) - 1
            b = cfg.first_last_bits if edge else cfg.bits
            self.bits[name] = b
            self.layers[name] = q
            if b < FP32_BITS:
                cdim = 1 if isinstance(q, QConv2d) else -1
                dx, dw = grad_transforms(b, cfg.granularity, cdim)
                q.backward.grad_dx, q.backward.grad_dw = dx, dw
                if choose_kernel(ctx.device, b) == "int8":
                    from qsearch.quant.int8_gemm import Int8GradGemm

                    q.backward.int8 = Int8GradGemm(
                        q, b, cfg.granularity,
                        lambda g, keep, b=b: sr_levels(g, b, keep), cdim)
                    self.int8_layers += 1
        self.kernel = "int8" if self.int8_layers else "simulated"
        if not cfg.hypernet.enabled:
            return
        for name, b in self.bits.items():
            if b < FP32_BITS:
                self.hyper_index[name] = len(self.hyper)
                self.hyper.append(Hypernet(cfg.hypernet.hidden))
                self.layers[name].weight_transform = _MetaWeight(self, name, self.layers[name])
        self.hyper.to(ctx.device)
        self.hyper_opt = torch.optim.Adam(self.hyper.parameters(), lr=cfg.hypernet.lr)

    # -- every step --------------------------------------------------------------------
    def before_forward(self, ctx: TrainContext) -> None:
        """Read each layer's current LR (TR/TALR may give every layer its own group)."""
        if not self.hyper_index or ctx.optimizer is None:
            return
        lr_of = {id(p): g["lr"] for g in ctx.optimizer.param_groups for p in g["params"]}
        for name in self.hyper_index:
            self.lrs[name] = float(lr_of.get(id(self.layers[name].weight), 0.0))

    @torch.no_grad()
    def after_backward(self, ctx: TrainContext) -> None:
        """Commit the meta update this step's forward used (``W <- W - lr * H(G_prev)``, so
        the optimizer steps from the weights the gradient was taken at), and keep this step's
        weight gradients (after LTS masking): the hypernetwork's input at the next step."""
        sample = ctx.step % ctx.steps_per_epoch == ctx.steps_per_epoch - 1  # last batch
        for name in self.hyper_index:
            w = self.layers[name].weight
            delta = self.pending.pop(name, None)
            if delta is not None:
                w.sub_(delta)
                if sample:
                    self.meta_norm[name] = delta.norm()
                    self._before_step[name] = w.detach().clone()
            g = w.grad
            if g is None:
                continue
            prev = self.g_prev.get(name)
            if prev is None:
                self.g_prev[name] = g.detach().clone()
            else:
                prev.copy_(g)

    def after_step(self, ctx: TrainContext) -> None:
        with torch.no_grad():
            for name, before in self._before_step.items():
                self.step_norm[name] = (self.layers[name].weight - before).norm()
        self._before_step = {}
        if self.hyper_opt is not None:
            self.hyper_opt.step()
            self.hyper_opt.zero_grad(set_to_none=True)

    # -- reporting ---------------------------------------------------------------------
    def metrics(self, ctx: TrainContext) -> dict[str, float]:
        quantized = [b for b in self.bits.values() if b < FP32_BITS]
        out: dict[str, Any] = {
            "bits": float(self.config.bits),
            "quantized_layers": float(len(quantized)) / max(1, len(self.bits)),
            # "simulated": fake-quantized dY, FP32 GEMMs (what backward_flops counts);
            # "int8": INT8 GEMMs on CUDA where a layer's operands allow it.
            "kernel": self.kernel,
            "int8_layers": float(self.int8_layers) / max(1, len(self.bits)),
        }
        if self.corr_ratio:
            ratios = [float(v) for v in self.corr_ratio.values()]
            out["hypernet.correction_ratio"] = sum(ratios) / len(ratios)
        shares = [float(self.meta_norm[n] / self.step_norm[n].clamp_min(1e-30))
                  for n in self.meta_norm if n in self.step_norm]
        if shares:  # ||lr * H(G_prev)|| / ||optimizer step||, an epoch's last step, layer mean
            out["hypernet.update_share"] = sum(shares) / len(shares)
        return out

    def layer_stats(self, ctx: TrainContext) -> dict[str, dict[str, float]]:
        return {n: {"g_bits": float(b)} for n, b in self.bits.items()}

    def extra_backward_bops(self, ctx: TrainContext) -> float:
        """Hypernetwork cost per sample: per step, ``H`` runs on every element of its layer's
        weight in FP32: ``2h`` MACs forward (``fc1``, ``fc2``) and ``3h`` backward (``fc2``'s
        dX and dW, ``fc1``'s dW; its input is a detached gradient, so no ``fc1`` dX). One step
        serves one batch, so divide by the batch size."""
        if not self.hyper_index:
            return 0.0
        h = self.config.hypernet.hidden
        elems = sum(self.layers[n].weight.numel() for n in self.hyper_index)
        return elems * 5.0 * h * FP32_BITS * FP32_BITS / ctx.config.batch_size

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.hyper_index:
            return {}
        return {
            "hyper": self.hyper.state_dict(),
            "hyper_opt": self.hyper_opt.state_dict() if self.hyper_opt is not None else {},
            "g_prev": {n: t.detach().cpu() for n, t in self.g_prev.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or not self.hyper_index:
            return
        self.hyper.load_state_dict(state["hyper"])
        if self.hyper_opt is not None and state.get("hyper_opt"):
            self.hyper_opt.load_state_dict(state["hyper_opt"])
        self.g_prev = {
            n: t.to(self.layers[n].weight.device) for n, t in state.get("g_prev", {}).items()
            if n in self.hyper_index
        }
