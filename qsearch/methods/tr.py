"""TR scheduling with TALR: schedule how many weights change level (METHODS.md §3).

Instead of a learning-rate schedule the user sets a target transition rate R_t (the fraction
of quantized weights whose integer level changes per step). Every training step, under
no_grad and before the forward, each quantized layer's integer levels are compared with the
previous step's to give the measured rate k_t; the transition-adaptive LR (TALR) then follows

    K_t = m*K_(t-1) + (1-m)*k_t,   U_t = U_(t-1) * (m + (1-m)*R_t/(K_t + 1e-8)),   lr_t = alpha*U_t

with K_0 = R_0 and U_0 = 1, U clamped to [u_min, u_max]. ``scope=layer`` keeps one (K, U) per
quantized layer (the reference code); ``scope=global`` one for the whole network (the paper).

TALR drives only the latent weights of quantized layers: ``param_groups`` splits the
``qweights`` param group into one group per layer (other groups keep the trial's LR and
schedule). While TR is on the weight step sizes stay at their init (``requires_grad`` off
before the optimizer is built), so transitions come from the latent weights only. With LTS,
frozen weights never change level (their value and the step are fixed), so they count as
non-transitioning and, having zero gradient and restored values, take no TALR step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from qsearch.errors import ConfigError
from qsearch.methods.plugin import Method
from qsearch.methods.tr_config import TRConfig

if TYPE_CHECKING:
    from qsearch.quant import QuantLayer
    from qsearch.config import TrialConfig
    from qsearch.methods.plugin import TrainContext

EPS = 1e-8


# ----------------------------------------------------------------------------- exact rules


def target_rate(schedule: str, r0: float, epoch: int, epochs: int) -> float:
    """R for (0-based) ``epoch`` of ``epochs``: cosine ``R_0(1+cos(pi e/E))/2``, linear
    ``R_0(1-e/E)``, step ``R_0 * 0.1^(e // ceil(E/3))``."""
    epochs = max(1, epochs)
    if schedule == "cosine":
        return r0 * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "linear":
        return r0 * (1 - epoch / epochs)
    if schedule == "step":
        return r0 * 0.1 ** (epoch // max(1, math.ceil(epochs / 3)))
    raise ConfigError("methods.tr.schedule", f"unknown schedule {schedule!r}")


def talr_update(k_prev: torch.Tensor, u_prev: torch.Tensor, k: torch.Tensor, target: float,
                momentum: float, u_min: float, u_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One TALR step on (K, U) given the measured rate ``k`` (tensors broadcast: one entry per
    layer, or a single one for the global scope)."""
    k_new = momentum * k_prev + (1 - momentum) * k
    u_new = u_prev * (momentum + (1 - momentum) * target / (k_new + EPS))
    return k_new, u_new.clamp(u_min, u_max)


@torch.no_grad()
def count_transitions(levels: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """How many elements changed integer level since the previous step (a 0-dim tensor on
    the levels' device, so the caller can gather all layers in one host transfer)."""
    return (levels != prev).sum()


# ----------------------------------------------------------------------------- the method


class TR(Method):
    """Transition-rate scheduling with the transition-adaptive LR (module docstring)."""

    config: TRConfig

    def __init__(self, config: TRConfig):
        super().__init__(config)
        self.layers: dict[str, QuantLayer] = {}
        self._opt: torch.optim.Optimizer | None = None
        self.alpha = 0.0
        self.t = 0
        self.K = torch.zeros(0, dtype=torch.float64)
        self.U = torch.zeros(0, dtype=torch.float64)
        self._sizes = torch.zeros(0, dtype=torch.float64)
        self._reset_epoch()
        self._last: dict[str, float] = {}

    def _reset_epoch(self) -> None:
        self._trans = torch.zeros(len(self.layers), dtype=torch.float64)
        self._measured_steps = 0

    # -- set-up ------------------------------------------------------------------------
    def attach(self, ctx: TrainContext) -> None:
        self.layers = {n: q for n, q in ctx.qlayers.items() if q.w_quant.enabled}
        for q in self.layers.values():
            q.w_quant.step.requires_grad_(False)  # steps fixed at init while TR is on
            q.register_buffer("tr_prev", torch.zeros_like(q.weight, dtype=torch.int8))
        n = 1 if self.config.scope == "global" else len(self.layers)
        self.K = torch.full((n,), self.config.r0, dtype=torch.float64)
        self.U = torch.ones(n, dtype=torch.float64)
        self.alpha = self.config.lr_scale * ctx.config.lr
        self._sizes = torch.tensor([float(q.weight.numel()) for q in self.layers.values()],
                                   dtype=torch.float64)
        self._reset_epoch()

    def param_groups(self, ctx: TrainContext, groups: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        """Give every quantized layer's latent weight its own param group (per-layer TALR);
        the layers' weights are found by identity in whichever group holds them."""
        by_id = {id(q.weight): n for n, q in self.layers.items()}
        keep: list[dict[str, Any]] = []
        per_layer: dict[str, dict[str, Any]] = {}
        for group in groups:
            base = {k: v for k, v in group.items() if k != "params"}
            rest = [p for p in group["params"] if id(p) not in by_id]
            if rest:
                keep.append({**base, "params": rest})
            for p in group["params"]:
                if id(p) in by_id:
                    name = by_id[id(p)]
                    per_layer[name] = {**base, "params": [p], "layer": name, "lr": self.alpha}
        return keep + [per_layer[n] for n in self.layers if n in per_layer]

    def configure_optimizer(self, ctx: TrainContext) -> None:
        # Keep the optimizer, not its group dicts: load_state_dict replaces those on resume.
        self._opt = ctx.optimizer

    # -- every step --------------------------------------------------------------------
    def current_target(self, ctx: TrainContext) -> float:
        epochs = ctx.config.epochs - ctx.qat_start_epoch
        return target_rate(self.config.schedule, self.config.r0,
                           ctx.epoch - ctx.qat_start_epoch, epochs)

    @torch.no_grad()
    def before_forward(self, ctx: TrainContext) -> None:
        per_layer: list[torch.Tensor] = []
        for q in self.layers.values():
            lv = q.w_quant.levels(q.weight).to(torch.int8)
            if self.t > 0:
                per_layer.append(count_transitions(lv, q.tr_prev))
            q.tr_prev.copy_(lv)
        sizes = self._sizes
        if per_layer:  # one host transfer for all layers
            counts = torch.stack(per_layer).cpu().to(torch.float64)
            if self.config.scope == "global":
                k = counts.sum(0, keepdim=True) / sizes.sum()
            else:
                k = counts / sizes
            cfg = self.config
            self.K, self.U = talr_update(self.K, self.U, k, self.current_target(ctx),
                                         cfg.momentum, cfg.u_min, cfg.u_max)
            self._trans += counts
            self._measured_steps += 1
        self._set_lrs()
        self.t += 1

    def _set_lrs(self) -> None:
        u = self.U.expand(len(self.layers)) if self.config.scope == "global" else self.U
        lr_of = {n: self.alpha * float(u[i]) for i, n in enumerate(self.layers)}
        for g in self._opt.param_groups if self._opt is not None else []:
            if "layer" in g:
                g["lr"] = lr_of[g["layer"]]

    # -- every epoch -------------------------------------------------------------------
    def epoch_end(self, ctx: TrainContext) -> None:
        steps = max(1, self._measured_steps)
        sizes = self._sizes
        per_layer = self._trans / (sizes * steps)
        overall = float(self._trans.sum() / (sizes.sum() * steps)) if len(self.layers) else 0.0
        u = self.U.expand(len(self.layers)) if self.config.scope == "global" else self.U
        self._last = {"transition_rate": overall, "target_rate": self.current_target(ctx)}
        for i, n in enumerate(self.layers):
            self._last[f"transition_rate.{n}"] = float(per_layer[i])
            self._last[f"talr.{n}"] = self.alpha * float(u[i])
        self._reset_epoch()

    def metrics(self, ctx: TrainContext) -> dict[str, float]:
        return dict(self._last)

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "K": self.K.clone(), "U": self.U.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.t = int(state["t"])
        self.K = state["K"].clone().to(torch.float64)
        self.U = state["U"].clone().to(torch.float64)
        self._set_lrs()
