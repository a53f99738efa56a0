"""LTS: freeze weights that sit on their quantization level (METHODS.md §2).

Every training step (in ``before_forward``, under no_grad) each quantized weight element gets
its distance to the level the forward uses, ``e = |w/s - clamp(round(w/s), -Qn, Qp)|`` (a
clipped weight keeps its clipping error, so it never freezes on a fake small distance), folded
into an EMA ``d``; a level change resets ``d`` to one full level. After the warm-up, elements
with ``d <= theta_t`` freeze for good. A frozen element does not change at all: its gradient
is zeroed, its value is restored after the optimizer step (so weight decay and momentum
cannot move it) and its optimizer state is zeroed.

With ``granularity: channel`` the decision is made per output channel instead: a channel
freezes as a unit when the mean (or max, ``channel_reduce``) of its elements' EMA distances is
``<= theta_t``.

What is skipped, and what is only counted. The backward leaves out the weight-gradient GEMM
rows of output channels that are frozen whole (``layer.backward.dw_channels``: one smaller
GEMM over the unfrozen rows), and a fully frozen layer stops requiring grad, so autograd skips
its dW GEMM entirely. Element-level freezing inside a channel saves nothing that runs. Two
figures are therefore reported side by side:

* ``flops_saved_counted`` (the paper's convention, also ``bwd_flops_saved``):
  ``sum_l rho_l * MACs_l / sum_l 2 * MACs_l``, every frozen *element* counted as a saved dW
  multiply-accumulate. Only the modelled ``backward_bops`` uses it.
* ``flops_saved_executed``: the dW FLOPs that really did not run (measured by the trainer's
  FLOP meter, :mod:`qsearch.quant.flops`) over the same dense backward. This is what
  ``backward_flops`` sees. With ``granularity: channel`` the two agree (up to grouped convs,
  and on CPU small-fan-in and channels-last depthwise convs, whose dW is computed in full:
  :func:`qsearch.quant.functional.gathered_dw_rows`); with ``element`` the executed one is
  usually far smaller.

All per-element state (mask, EMA, previous levels, frozen-time accumulator) lives in buffers
on the quantized layers, hence in the model's ``state_dict``; the step counter is in
:meth:`LTS.state_dict`. A resumed run therefore continues the schedule exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from qsearch.errors import ConfigError
from qsearch.methods.lts_config import LTSConfig
from qsearch.methods.plugin import Method

if TYPE_CHECKING:
    from qsearch.quant import QuantLayer
    from qsearch.config import TrialConfig
    from qsearch.methods.plugin import TrainContext

#: Optimizer state entries that carry a per-element history of past gradients.
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# ----------------------------------------------------------------------------- exact rules


def threshold(mode: str, rate: float, t: int, warmup: int, total: int) -> float | None:
    """theta_t in level units at (0-based) step ``t``; None while ``t < warmup`` (no freezing).

    fixing: ``rate``; linear-growth: ``(t - T_w)/(T - T_w)``; sine-growth:
    ``sin(pi/2 * (t - T_w)/(T - T_w))``.
    """
    if t < warmup:
        return None
    if mode == "fixing":
        return float(rate)
    frac = (t - warmup) / max(1, total - warmup)
    if mode == "linear-growth":
        return float(frac)
    if mode == "sine-growth":
        return math.sin(math.pi / 2 * frac)
    raise ConfigError("methods.lts.mode", f"unknown mode {mode!r}")


@torch.no_grad()
def level_error(w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, q): distance to the level the forward uses, ``e = |w/s - clamp(round(w/s), -Qn, Qp)|``,
    and that (clipped) integer level ``q``.

    ``w * step.reciprocal()`` is exactly what the LSQ forward computes, so ``q`` is the level
    the forward uses. As in the reference, a clipped weight carries its clipping error (a
    weight 3.4 levels past the range has e = 3.4, not 0.4), so it cannot freeze on a small
    distance to a level that does not exist.
    """
    v = w * step.reciprocal()
    q = v.round().clamp_(-qn, qp)
    return (v - q).abs_(), q


@torch.no_grad()
def ema_update(dist: torch.Tensor, err: torch.Tensor, levels: torch.Tensor,
               prev: torch.Tensor, momentum: float, first: bool) -> None:
    """In place: ``d = m*d + (1-m)*e`` (``d = e`` at the first step); ``d = 1`` where the level
    changed since the previous step."""
    if first:
        dist.copy_(err)
        return
    dist.mul_(momentum).add_(err, alpha=1.0 - momentum)
    dist.masked_fill_(levels != prev, 1.0)


@torch.no_grad()
def freeze(mask: torch.Tensor, dist: torch.Tensor, theta: float | None) -> int:
    """Freeze (permanently) every element with ``d <= theta``; returns how many newly froze."""
    if theta is None:
        return 0
    new = (dist <= theta) & ~mask
    n = int(new.sum())
    if n:
        mask |= new
    return n


@torch.no_grad()
def freeze_channels(mask: torch.Tensor, dist: torch.Tensor, theta: float | None,
                    reduce: str = "mean") -> int:
    """Channel granularity: freeze (permanently, as a unit) every output channel whose
    ``reduce`` (mean or max) of its elements' EMA distances is ``<= theta``; returns how many
    elements newly froze."""
    if theta is None:
        return 0
    d = dist.reshape(dist.shape[0], -1)
    cd = d.mean(dim=1) if reduce == "mean" else d.amax(dim=1)
    new = (cd <= theta) & ~mask.reshape(mask.shape[0], -1).all(dim=1)
    n = int(new.sum())
    if n:
        mask[new] = True  # on ``mask`` itself: a reshape of a channels-last mask is a copy
    return n * (mask.numel() // mask.shape[0])


# ----------------------------------------------------------------------------- the method


class LTS(Method):
    """Lottery-ticket-scratcher freezing on the LSQ grid (see the module docstring)."""

    config: LTSConfig

    def __init__(self, config: LTSConfig):
        super().__init__(config)
        self.t = 0  # LTS steps done (QAT steps since attach)
        self.total = 1
        self.warmup = 0
        self.layers: dict[str, QuantLayer] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self._any_frozen: dict[str, bool] = {}  # per layer; recomputed when the mask changes
        self._macs: dict[str, int] | None = None
        self._samples0 = 0  # trained samples before LTS's first step (a CSQ stage)

    # -- set-up ------------------------------------------------------------------------
    def attach(self, ctx: TrainContext) -> None:
        self.layers = {n: q for n, q in ctx.qlayers.items() if q.w_quant.enabled}
        for q in self.layers.values():
            w = q.weight
            q.register_buffer("lts_frozen", torch.zeros_like(w, dtype=torch.bool))
            q.register_buffer("lts_dist", torch.ones_like(w))
            q.register_buffer("lts_prev", torch.zeros_like(w, dtype=torch.int8))
            # Sum over steps of the layer's frozen fraction (time average = this / t).
            q.register_buffer("lts_frozen_steps", torch.zeros((), dtype=torch.float64, device=w.device))
        if getattr(ctx, "costs", None) is not None:
            self._samples0 = int(ctx.costs.flops.samples)
        qat_epochs = max(1, ctx.config.epochs - ctx.qat_start_epoch)
        self.total = qat_epochs * ctx.steps_per_epoch
        self.warmup = int(self.config.warmup_frac * self.total)

    # -- every step --------------------------------------------------------------------
    @torch.no_grad()
    def before_forward(self, ctx: TrainContext) -> None:
        cfg = self.config
        theta = threshold(cfg.mode, cfg.rate, self.t, self.warmup, self.total)
        for name, q in self.layers.items():
            qn, qp = q.w_quant.bounds()
            err, lv = level_error(q.weight, q.w_quant.step, qn, qp)
            lv = lv.to(torch.int8)
            ema_update(q.lts_dist, err, lv, q.lts_prev, cfg.momentum, first=self.t == 0)
            q.lts_prev.copy_(lv)
            # Host syncs only after the warm-up, and the layout only when the mask changed.
            if cfg.granularity == "channel":
                changed = freeze_channels(q.lts_frozen, q.lts_dist, theta, cfg.channel_reduce)
            else:
                changed = freeze(q.lts_frozen, q.lts_dist, theta)
            if changed or name not in self._any_frozen:
                self._any_frozen[name] = _apply_layout(q)
            q.lts_frozen_steps += q.lts_frozen.float().mean().double()
        self.t += 1

    @torch.no_grad()
    def after_backward(self, ctx: TrainContext) -> None:
        self._saved = {}
        for name, q in self.layers.items():
            g = q.weight.grad
            if g is None or not self._any_frozen.get(name, False):
                continue
            g.masked_fill_(q.lts_frozen, 0.0)
            self._saved[name] = q.weight.detach().masked_select(q.lts_frozen)

    @torch.no_grad()
    def after_step(self, ctx: TrainContext) -> None:
        opt = ctx.optimizer
        for name, saved in self._saved.items():
            q = self.layers[name]
            mask = q.lts_frozen
            # Undo whatever weight decay / momentum did to frozen elements: bit-identical.
            q.weight.masked_scatter_(mask, saved)
            state = opt.state.get(q.weight, {}) if opt is not None else {}
            for key in _MOMENTUM_KEYS:
                buf = state.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == mask.shape:
                    buf.masked_fill_(mask, 0.0)
        self._saved = {}

    # -- reporting ---------------------------------------------------------------------
    def frozen_fractions(self) -> dict[str, float]:
        """Current frozen fraction of each quantized layer."""
        return {n: float(q.lts_frozen.float().mean()) for n, q in self.layers.items()}

    def time_averaged(self) -> dict[str, float]:
        """rho_l: time average over the steps so far of each layer's frozen fraction."""
        return {n: float(q.lts_frozen_steps) / max(1, self.t) for n, q in self.layers.items()}

    def updates_eliminated(self) -> float:
        """Time average over steps of the frozen fraction of all quantized weights."""
        rho = self.time_averaged()
        sizes = {n: q.weight.numel() for n, q in self.layers.items()}
        total = sum(sizes.values())
        return sum(rho[n] * sizes[n] for n in rho) / max(1, total)

    def metrics(self, ctx: TrainContext) -> dict[str, float]:
        cur = self.frozen_fractions()
        sizes = {n: q.weight.numel() for n, q in self.layers.items()}
        overall = sum(cur[n] * sizes[n] for n in cur) / max(1, sum(sizes.values()))
        counted = self.bwd_flops_saved(ctx)
        out = {"frozen_fraction": overall, "updates_eliminated": self.updates_eliminated(),
               "bwd_flops_saved": counted, "flops_saved_counted": counted,
               "flops_saved_executed": self.flops_saved_executed(ctx),
               "frozen_channel_fraction": self.frozen_channel_fraction()}
        out.update({f"frozen_fraction.{n}": v for n, v in cur.items()})
        return out

    def _layer_macs(self, ctx: TrainContext) -> dict[str, int]:
        if self._macs is None:
            from qsearch.cost import count_macs

            self._macs = count_macs(ctx.model, ctx.input_shape)
        return self._macs

    def bwd_flops_saved(self, ctx: TrainContext) -> float:
        """*Counted* saving, the LTS paper's convention (METHODS.md §7): sum rho_l*MACs_l /
        sum 2*MACs_l over conv/linear — every frozen element is credited with its dW MACs,
        whether or not the backward can leave them out. Also ``flops_saved_counted``."""
        macs = self._layer_macs(ctx)
        rho = self.time_averaged()
        total = sum(macs.values())
        return sum(rho.get(n, 0.0) * m for n, m in macs.items()) / max(1, 2 * total)

    def flops_saved_executed(self, ctx: TrainContext) -> float:
        """*Executed* saving: dW FLOPs that did not run during LTS's steps (frozen output
        channels and layers, as the trainer's FLOP meter recorded them) over the dense
        backward those steps would have run, ``sum_l 2 * 2 * MACs_l`` per sample (the same
        denominator as the counted figure). 0 without the trainer's meter."""
        costs = getattr(ctx, "costs", None)
        if costs is None:
            return 0.0
        samples = costs.flops.samples - self._samples0
        dense = 4.0 * sum(self._layer_macs(ctx).values()) * samples
        return float(costs.flops.dw_skipped / dense) if dense > 0 else 0.0

    def frozen_channel_fraction(self) -> float:
        """Share of all output channels (of LTS's layers) frozen whole, now."""
        frozen = total = 0
        for q in self.layers.values():
            m = q.lts_frozen.reshape(q.lts_frozen.shape[0], -1)
            frozen += int(m.all(dim=1).sum())
            total += m.shape[0]
        return frozen / max(1, total)

    def layer_stats(self, ctx: TrainContext) -> dict[str, dict[str, float]]:
        return {n: {"frozen_fraction": v} for n, v in self.time_averaged().items()}

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "samples0": self._samples0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state.get("t", 0))
        self._samples0 = int(state.get("samples0", 0))
        self._any_frozen = {n: _apply_layout(q) for n, q in self.layers.items()}


def _apply_layout(q: QuantLayer) -> bool:
    """Turn the frozen mask into skipped work: a fully frozen layer stops requiring grad (no
    weight-gradient GEMM at all; its weight step is fixed too, as nothing it scales can move);
    fully frozen output channels are left out of the GEMM via ``backward.dw_channels``.
    Returns whether any element of the layer is frozen."""
    mask = q.lts_frozen
    if bool(mask.all()):
        q.weight.requires_grad_(False)
        q.w_quant.step.requires_grad_(False)
        q.backward.dw_channels = None
        return True
    ch_frozen = mask.reshape(mask.shape[0], -1).all(dim=1)
    if bool(ch_frozen.any()):
        q.backward.dw_channels = torch.nonzero(~ch_frozen).flatten()
    else:
        q.backward.dw_channels = None
    return bool(mask.any())

