"""CSQ: learn per-layer bit-widths under a size budget, then train them (METHODS.md §5).

A CSQ trial has two stages. Stage 1 (:meth:`CSQ.precision_stage`, the first
``round(epochs_frac * epochs)`` epochs) swaps every searched conv/linear for a bit-plane layer
(:mod:`qsearch.methods.csq_layers`) and trains planes, gates and the rest of the network with

    loss = CE + lambda * (p * (rho - rho*) + I_t) * sum_l w_l sum_j sigmoid(beta * m_lj)
    I_t  = I_(t-1) + integral_gain * (rho - rho*)

``rho`` is the (parameter-weighted) fraction of open planes, ``rho* = (target_bits - 1) / n``
(a layer with k planes is k + 1 bits: the sign), ``w_l`` the layer's size weight and ``p`` 1
with ``proportional`` (the reference's term), else 0: by default the price of a plane is the
running sum of past budget errors, a Lagrange multiplier found by dual ascent, which settles
where exactly the budget's worth of planes is worth its price to the task loss. Gate logits
move by ``gate_lr`` against the sign of their gradient (``gate_step: sign``, see
:meth:`SearchStage.sign_step`) and start on a small MSB-first ramp (:func:`gate_init`).

The global temperature is ``beta = beta_final^(t/t_ticket)`` (``t`` in fractional epochs, so it
grows every step). From ``t_ticket`` (``ticket_frac`` of stage 1) the ticket is drawn at the
first step whose hard pattern is within ``budget_tol`` of the budget, at the latest
``ticket_wait`` of the remaining stage later. Drawing reads ``1[sigmoid(beta*m) >= 0.5]``,
makes each layer's active planes contiguous (same count; every change is reported) and, only
with the ``enforce_budget`` fallback and only if the pattern missed the band, projects it
(reported as ``projection_fired`` and ``planes_moved``). The remaining stage-1 steps
fine-tune with the hard pattern at ``beta_final``.

The read-out (bits per layer, sign included) is returned to the trainer, which runs stage 2:
LSQ QAT at those bits, continuing from the stage-1 weights (``carry_weights``), with every
other enabled method. First/last layers stay at ``first_bits``/``last_bits`` and layers with
an explicit ``layers.<name>.w_bits`` rule keep it; ``search_edges`` searches the first/last
layers too.

Budgets: ``target_bits`` is the parameter-weighted average weight bits of the searched layers
(so a budget of b has exactly the size of uniform b-bit LSQ with the same first/last layers);
``target_mb`` is the whole model's ``size_mb`` (§7), converted to the equivalent average.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qsearch.cost import FP32_BITS, extra_param_count
from qsearch.errors import ConfigError
from qsearch.methods.csq_config import MIN_BITS, SIGN_BITS, CSQConfig
from qsearch.methods.plugin import Method, Stage
from qsearch.methods.csq_layers import (
    BitConv2d,
    BitLinear,
    BitPlaneLayer,
    contiguous_window,
    is_contiguous,
    plane_bits,
    window_pattern,
)

if TYPE_CHECKING:
    from qsearch.config import TrialConfig
    from qsearch.methods.plugin import TrainContext

log = logging.getLogger(__name__)
INTEGRAL_CAP = 100.0  # anti-windup bound of the budget loop's integral term
MIN_PLANES = MIN_BITS - SIGN_BITS  # a searched layer keeps at least one magnitude plane
GATE_CLIP = 40.0  # bound on |beta_final * m| under gate_step=sign (sigmoid' stays > 1e-18)


# ----------------------------------------------------------------------------- budget


@dataclass
class Budget:
    """Sizes of the searched and pinned layers, and the bit budget of the searched ones.

    ``bits`` arguments are per-layer weight bits, sign included (:func:`plane_bits`)."""

    numel: dict[str, int]  # searched layers, forward order
    pinned_bits: int  # sum N_l * b_l of the layers CSQ does not search
    extra_params: int  # FP32 extras (BN, biases, quantizer steps), METHODS.md §7
    target_bits: float  # parameter-weighted average over the searched layers

    @property
    def total_numel(self) -> int:
        return sum(self.numel.values())

    @property
    def budget_bits(self) -> float:
        return self.target_bits * self.total_numel

    def searched_bits(self, bits: dict[str, int]) -> int:
        return sum(self.numel[n] * bits[n] for n in self.numel)

    def size_mb(self, bits: dict[str, int]) -> float:
        searched = self.searched_bits(bits)
        return (searched + self.pinned_bits + FP32_BITS * self.extra_params) / 8 / 1e6

    def budget_mb(self) -> float:
        return (self.budget_bits + self.pinned_bits + FP32_BITS * self.extra_params) / 8 / 1e6

    def avg_bits(self, bits: dict[str, int]) -> float:
        return self.searched_bits(bits) / max(1, self.total_numel)

    def rel_error(self, bits: dict[str, int]) -> float:
        """(searched bits - budget) / budget: the figure ``budget_tol`` bounds."""
        return self.searched_bits(bits) / max(1e-12, self.budget_bits) - 1.0


def make_budget(cfg: CSQConfig, numel: dict[str, int], pinned_bits: int, extra_params: int,
                min_bits: int = MIN_BITS) -> Budget:
    """Resolve ``target_bits``/``target_mb`` to an average over the searched layers (bits
    counted with the sign: ``planes`` planes reach ``planes + 1`` bits)."""
    b = Budget(numel, pinned_bits, extra_params, 0.0)
    top = plane_bits(cfg.planes)
    if cfg.target_mb is not None:
        fixed = pinned_bits + FP32_BITS * extra_params
        target = (cfg.target_mb * 8e6 - fixed) / max(1, b.total_numel)
        lo = Budget(numel, pinned_bits, extra_params, min_bits).budget_mb()
        hi = Budget(numel, pinned_bits, extra_params, top).budget_mb()
        if not min_bits <= target <= top:
            raise ConfigError("methods.csq.target_mb",
                              f"{cfg.target_mb} MB is out of reach for this model; with "
                              f"{cfg.planes} planes ({top} bits) the size can be {lo:.4g} to "
                              f"{hi:.4g} MB")
        b.target_bits = target
    else:
        b.target_bits = float(cfg.target_bits if cfg.target_bits is not None else 3.0)
    return b


# ----------------------------------------------------------------------------- hardening


@dataclass
class Hardening:
    """What drawing the ticket did: per-layer windows and every change it made."""

    windows: dict[str, tuple[int, int]]  # layer -> (first active plane, active planes)
    raw: dict[str, list[int]]
    noncontiguous: dict[str, str] = field(default_factory=dict)  # layer -> "raw -> resolved"
    projected: int = 0  # planes opened or closed by the budget projection (enforce_budget)
    projection_fired: bool = False  # the projection ran (the soft search missed the band)

    def bits(self) -> dict[str, int]:
        return {n: plane_bits(k) for n, (_, k) in self.windows.items()}

    def patterns(self, planes: int) -> dict[str, list[int]]:
        return {n: window_pattern(planes, s, k) for n, (s, k) in self.windows.items()}


def harden(raw: dict[str, list[int]], scores: dict[str, list[float]], budget: Budget | None,
           tol: float, min_planes: int = MIN_PLANES) -> Hardening:
    """Turn raw gate patterns into contiguous windows; then, if ``budget`` is given (the
    ``enforce_budget`` fallback) and the windows miss ``[1-tol, 1+tol] * budget``, project.

    ``scores`` are the gate logits m (higher = more wanted). The projection closes (opens) the
    window end with the lowest (highest) logit per bit of its layer — a knapsack greedy —
    among moves that keep the size within the band; when no move fits it takes the smallest
    layer.
    """
    out = Hardening(windows={}, raw=raw)
    for name, pat in raw.items():
        start, k = contiguous_window(pat, scores[name], min_planes)
        resolved = window_pattern(len(pat), start, k)
        if resolved != pat:
            fmt = "".join(map(str, pat)), "".join(map(str, resolved))
            if not is_contiguous(pat):
                out.noncontiguous[name] = f"{fmt[0]} -> {fmt[1]}"
                log.info("CSQ layer %s: active planes %s not contiguous; kept window %s",
                         name, *fmt)
        out.windows[name] = (start, k)
    if budget is not None and abs(budget.rel_error(out.bits())) > tol:
        out.projection_fired = True
        out.projected = _project(out.windows, scores, budget, tol, min_planes)
        log.warning("CSQ: the searched pattern missed the budget band; enforce_budget moved "
                    "%d planes", out.projected)
    return out


def _project(windows: dict[str, tuple[int, int]], scores: dict[str, list[float]],
             budget: Budget, tol: float, min_planes: int) -> int:
    target = budget.budget_bits
    lo, hi = target * (1 - tol), target * (1 + tol)
    numel = budget.numel
    moves = 0

    def total() -> float:
        return sum(numel[n] * plane_bits(k) for n, (_, k) in windows.items())

    while total() > hi:  # close planes
        cands = []
        for n, (s, k) in windows.items():
            if k > min_planes:
                top, bot = scores[n][s], scores[n][s + k - 1]
                # damage per bit saved: the end plane's gate logit over the layer's size
                cands.append((min(top, bot) / numel[n], n,
                              (s + 1, k - 1) if top < bot else (s, k - 1)))
        if not cands:
            break
        fit = [c for c in cands if total() - numel[c[1]] >= lo]
        pick = min(fit) if fit else min(cands, key=lambda c: (numel[c[1]], c[0]))
        windows[pick[1]] = pick[2]
        moves += 1
    while total() < lo:  # open planes
        cands = []
        for n, (s, k) in windows.items():
            sc = scores[n]
            if s + k < len(sc):  # benefit per bit spent
                cands.append((sc[s + k] / numel[n], n, (s, k + 1)))
            if s > 0:
                cands.append((sc[s - 1] / numel[n], n, (s - 1, k + 1)))
        fit = [c for c in cands if total() + numel[c[1]] <= hi]
        if fit:
            pick = max(fit)
        else:
            if not cands:
                break
            pick = min(cands, key=lambda c: (numel[c[1]], -c[0]))
            if abs(total() + numel[pick[1]] - target) >= abs(total() - target):
                break
        windows[pick[1]] = pick[2]
        moves += 1
        if not fit:
            break
    return moves


# ----------------------------------------------------------------------------- the method


class CSQ(Method):
    """Two-stage CSQ trial: bit-plane search (stage 1) then LSQ QAT at the found bits."""

    config: CSQConfig

    def __init__(self, config: CSQConfig):
        super().__init__(config)
        self.summary: dict[str, Any] = {}

    def stage_epochs(self, ctx: TrainContext) -> int:
        e = ctx.config.epochs
        return min(e - 1, max(1, round(self.config.epochs_frac * e)))

    # -- stage 1 ---------------------------------------------------------------------
    def precision_stage(self, ctx: TrainContext) -> dict[str, int] | None:
        bits, summary = run_stage(self.config, ctx, self.stage_epochs(ctx))
        self.summary = summary
        return bits

    # -- reporting ---------------------------------------------------------------------
    def metrics(self, ctx: TrainContext) -> dict[str, float]:
        keys = ("avg_bits", "search_avg_bits", "target_bits", "budget_mb", "budget_error",
                "ticket_epoch",
                "noncontiguous", "projection_fired", "planes_moved", "projected",
                "stage_accuracy", "stage1_accuracy")
        return {k: float(self.summary[k]) for k in keys if k in self.summary}

    def state_dict(self) -> dict[str, Any]:
        return {"summary": dict(self.summary)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.summary = dict(state.get("summary", {}))


def searched_layers(cfg: TrialConfig, model: nn.Module) -> tuple[list[str], list[str]]:
    """(searched, pinned) layer names: first/last (unless ``search_edges``) and layers with an
    explicit ``w_bits`` rule are pinned."""
    import re

    from qsearch.quant.precision import quantizable_layers

    names = quantizable_layers(model)
    pinned: set[str] = set()
    if not cfg.methods.csq.search_edges:
        if cfg.first_bits is not None:
            pinned.add(names[0])
        if cfg.last_bits is not None:
            pinned.add(names[-1])
    for key, rule in cfg.layers.items():
        if rule.w_bits is None:
            continue
        if key.startswith("re:"):
            pinned.update(n for n in names if re.fullmatch(key[3:], n))
        else:
            pinned.add(key)
    return [n for n in names if n not in pinned], [n for n in names if n in pinned]


def layer_rules(weight_bits: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per-layer ``layers:`` rules that reproduce a trial's weight bits (for re-use/export)."""
    return {name: {"w_bits": int(b)} for name, b in weight_bits.items()}


def fp32_extras(cfg: TrialConfig, model: nn.Module) -> tuple[int, dict[str, int]]:
    """(FP32 extra parameter count, resolved weight bits) of ``model`` converted as stage 2
    will convert it; only whether quantizers are enabled matters, not their bits."""
    from qsearch.quant import Precision, convert

    probe = copy.deepcopy(model)
    qlayers = convert(probe, Precision.from_config(cfg))
    return extra_param_count(probe, qlayers), {n: q.w_bits for n, q in qlayers.items()}


def regularizer(layers: dict[str, BitPlaneLayer], weights: dict[str, float], rho: float,
                target_rho: float, lam: float, integral: float = 0.0) -> torch.Tensor:
    """lambda * (rho - target + integral) * sum_l w_l sum_j sigmoid(beta*m_lj).

    With ``integral = 0`` this is the reference's budget term. :class:`SearchStage` passes
    ``rho = target = 0`` unless ``proportional`` is on, so the price is the integral alone:
    the running sum of past errors, which removes the steady-state error a proportional loop
    leaves when the task loss holds gates open, and does not flip sign every time one plane
    crosses the budget."""
    total = sum(weights[n] * q.soft_gates().sum() for n, q in layers.items())
    return lam * (rho - target_rho + integral) * total


def open_fraction(layers: dict[str, BitPlaneLayer], shares: dict[str, float]) -> float:
    """rho: the share-weighted fraction of open planes (``sigmoid(beta*m) >= 0.5``, or the hard
    mask), each layer counted as the read-out will count it (at least one plane)."""
    return sum(shares[n] * (q.w_bits - SIGN_BITS) / q.planes for n, q in layers.items())


def temperature(t: float, t_ticket: float, beta_final: float) -> float:
    """beta = beta_final^(t / t_ticket), held at beta_final from the ticket on."""
    return beta_final ** min(1.0, t / max(t_ticket, 1e-9))


# ----------------------------------------------------------------------------- stage 1


STAGE_NAME = "csq.search"  # the stage's name in reports, errors and checkpoints


def _stage_groups(model: nn.Module, cfg: TrialConfig) -> list[dict[str, Any]]:
    """Bit logits, gate logits and scales get their own groups without weight decay (decay
    would pull bit logits to the undecided sigmoid(0) = 0.5); everything else as in QAT. With
    ``gate_step: sign`` the gate logits are in no group: :meth:`SearchStage.after_step`
    steps them."""
    c = cfg.methods.csq
    groups: dict[str, list[nn.Parameter]] = {"bits": [], "gates": [], "scales": [], "other": []}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        key = {"pbits": "bits", "nbits": "bits", "gates": "gates", "scale": "scales",
               "step": "scales"}.get(leaf, "other")
        groups[key].append(p)
    spec = [
        {"name": "csq_bits", "params": groups["bits"], "lr": c.bit_lr, "weight_decay": 0.0},
        {"name": "csq_gates", "params": groups["gates"], "lr": c.gate_lr, "weight_decay": 0.0},
        {"name": "steps", "params": groups["scales"], "lr": cfg.lr, "weight_decay": 0.0},
        {"name": "other", "params": groups["other"], "lr": cfg.lr,
         "weight_decay": cfg.weight_decay},
    ]
    if c.gate_step == "sign":
        spec = [g for g in spec if g["name"] != "csq_gates"]
    return [g for g in spec if g["params"]]


def _current_bits(layers: dict[str, BitPlaneLayer]) -> dict[str, int]:
    """Bits per layer as the gates stand (sign included, at least one plane)."""
    return {n: q.w_bits for n, q in layers.items()}


def gate_init(c: CSQConfig, target_bits: float) -> list[float]:
    """Initial gate logits m_j of every searched layer, MSB first.

    ``gate_ramp = 0`` is the reference's all-zero start (every plane half open, every gate of a
    layer identical). A ramp ``m_j = gate_ramp * (k* - 1/2 - j)`` around the budget's plane
    count ``k* = target_bits - 1`` opens the ``k*`` most significant planes first: the budget
    term then pushes on one marginal gate per layer instead of flipping every gate of a layer
    at once (the gates of a layer get the same push, and at the warm start's loss minimum the
    task loss gives them almost none)."""
    k = target_bits - SIGN_BITS
    return [c.gate_ramp * (k - 0.5 - j) for j in range(c.planes)]


class SearchStage(Stage):
    """Stage 1 as a :class:`~qsearch.methods.plugin.Stage` of the shared loop: before each
    forward the temperature (and, from ``t_ticket``, the ticket once the pattern is in band
    or the deadline has come); the budget term in the loss until the ticket; the sign step of
    the gates after each optimizer step; per-epoch ``csq.*`` metrics."""

    def __init__(self, c: CSQConfig, net: nn.Module, epochs: int,
                 layers: dict[str, BitPlaneLayer], budget: Budget):
        super().__init__(STAGE_NAME, net, epochs)
        self.c, self.layers, self.budget = c, layers, budget
        total = budget.total_numel
        self.shares = ({n: budget.numel[n] / total for n in layers} if c.size_aware
                       else {n: 1.0 / len(layers) for n in layers})
        # mean weight 1: lambda keeps its scale
        self.weights = {n: self.shares[n] * len(layers) for n in layers}
        self.target_rho = (budget.target_bits - SIGN_BITS) / c.planes
        self.t_ticket = c.ticket_frac * epochs
        # The ticket waits (at most to t_deadline) for a step whose hard pattern is in band.
        self.t_deadline = self.t_ticket + c.ticket_wait * (epochs - self.t_ticket)
        self.hard: Hardening | None = None
        self.integral = 0.0
        self.soft_avg = float("nan")
        self.beta, self.rho, self.t = 1.0, 0.0, 0.0
        self.t_drawn = float("nan")

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]]:
        return _stage_groups(self.model, ctx.config)

    def draw_ticket(self) -> Hardening:
        c, layers = self.c, self.layers
        raw = {n: q.raw_pattern() for n, q in layers.items()}
        self.soft_avg = self.budget.avg_bits(_current_bits(layers))
        scores = {n: q.gates.detach().tolist() for n, q in layers.items()}
        h = harden(raw, scores, self.budget if c.enforce_budget else None, c.budget_tol)
        for n, pat in h.patterns(c.planes).items():
            layers[n].set_pattern(pat)
        self.hard = h
        self.t_drawn = self.t
        return h

    @torch.no_grad()
    def sign_step(self) -> None:
        """Move every gate logit ``gate_lr`` against the sign of its gradient, then clip
        ``|beta_final * m|`` to ``GATE_CLIP``.

        Why not SGD: the task loss and the budget term reach a gate through the same factor
        ``beta * sigmoid'(beta*m)``, so the sign of the gradient is exactly the verdict "the
        plane's value to the task loss is below (above) its price" — but that factor vanishes
        for a saturated gate at high temperature, and in a short trial plain SGD freezes gates
        wherever the task loss threw them before the budget term has caught up (a 3-bit target
        landed at 4.3 bits). The clip keeps ``beta*m`` finite so the factor never underflows to
        0 and every gate can still follow the budget until the ticket."""
        clip = GATE_CLIP / self.c.beta_final
        for q in self.layers.values():
            g = q.gates.grad
            if g is not None:
                q.gates.sub_(self.c.gate_lr * g.sign()).clamp_(-clip, clip)
                q.gates.grad = None

    def in_band(self) -> bool:
        return abs(self.budget.rel_error(_current_bits(self.layers))) <= self.c.budget_tol

    def before_forward(self, ctx: TrainContext) -> None:
        t = self.t = self.progress(ctx)
        if self.hard is None and t >= self.t_ticket and (self.in_band() or t >= self.t_deadline):
            self.draw_ticket()
        self.beta = temperature(t, self.t_ticket, self.c.beta_final)
        for q in self.layers.values():
            q.beta = self.beta

    def loss(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        c = self.c
        self.rho = rho = open_fraction(self.layers, self.shares)
        if self.hard is None:
            self.integral = min(INTEGRAL_CAP, max(-INTEGRAL_CAP, self.integral
                                                  + c.integral_gain * (rho - self.target_rho)))
            p = 1.0 if c.proportional else 0.0
            loss = loss + regularizer(self.layers, self.weights, p * rho, p * self.target_rho,
                                      c.lam, self.integral)
        return loss

    def after_step(self, ctx: TrainContext) -> None:
        if self.c.gate_step == "sign":
            self.sign_step()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("csq t=%.3f beta=%.1f rho=%.3f I=%.2f gates=%s", self.t, self.beta,
                      self.rho, self.integral,
                      {n: [round(v * self.beta, 1) for v in q.gates.tolist()]
                       for n, q in self.layers.items()})

    def metrics(self, ctx: TrainContext) -> dict[str, Any]:
        bits, b = _current_bits(self.layers), self.budget
        return {"size_mb": b.size_mb(bits), "csq.stage": 1, "csq.avg_bits": b.avg_bits(bits),
                "csq.rho": self.rho, "csq.beta": self.beta, "csq.target_bits": b.target_bits}

    def state_dict(self) -> dict[str, Any]:
        h = self.hard
        return {"integral": self.integral, "soft_avg": self.soft_avg, "t_drawn": self.t_drawn,
                "hard": None if h is None
                else {"windows": {n: list(w) for n, w in h.windows.items()}, "raw": h.raw,
                      "noncontiguous": h.noncontiguous, "projected": h.projected,
                      "projection_fired": h.projection_fired}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral = float(state["integral"])
        self.soft_avg = float(state["soft_avg"])
        self.t_drawn = float(state["t_drawn"])
        h = state["hard"]
        self.hard = None if h is None else Hardening(
            windows={n: (int(w[0]), int(w[1])) for n, w in h["windows"].items()},
            raw={n: list(p) for n, p in h["raw"].items()},
            noncontiguous=dict(h["noncontiguous"]), projected=int(h["projected"]),
            projection_fired=bool(h["projection_fired"]))
        if self.hard is not None:
            for n, pat in self.hard.patterns(self.c.planes).items():
                self.layers[n].set_pattern(pat)


def run_stage(c: CSQConfig, ctx: TrainContext, epochs1: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Stage 1 of a CSQ trial (see the module docstring), run by the trainer's shared loop
    (``ctx.run_stage``: NaN guard, reports, per-epoch checkpoints and resume). Returns (bits
    per searched layer, summary) and sets ``ctx.qat_start_epoch``; with ``carry_weights`` the
    float model ``ctx.model`` receives the stage-1 weights (hard-gated reconstruction, BN,
    biases)."""
    from qsearch.quant import Precision, convert
    from qsearch.quant.precision import resolve_precision

    cfg, model = ctx.config, ctx.model
    searched, pinned = searched_layers(cfg, model)
    if not searched:
        raise ConfigError("methods.csq.search_edges",
                          "every layer is pinned (first/last or a layers.<name>.w_bits rule); "
                          "set search_edges=true or drop a rule so CSQ has a layer to search")
    precision = Precision.from_config(cfg)
    plan = resolve_precision(model, precision)
    extras, _ = fp32_extras(cfg, model)
    numel = {n: model.get_submodule(n).weight.numel() for n in searched}
    pinned_bits = sum(model.get_submodule(n).weight.numel() * plan[n].w_bits for n in pinned)
    budget = make_budget(c, numel, pinned_bits, extras)

    def bit_plane(name: str, m: nn.Module, p: Any, signed: bool | None) -> nn.Module | None:
        if name not in numel:
            return None  # pinned: plain LSQ at its resolved bits
        return (BitConv2d if isinstance(m, nn.Conv2d) else BitLinear).from_float(
            m, c.planes, p.a_bits, signed, gate_init(c, budget.target_bits))

    net = copy.deepcopy(model)
    converted = convert(net, precision, bit_plane)
    layers: dict[str, BitPlaneLayer] = {
        n: q for n, q in converted.items() if isinstance(q, BitPlaneLayer)}
    stage = SearchStage(c, net, epochs1, layers, budget)
    history = ctx.run_stage(stage)
    acc = history[-1]["accuracy"]
    hard = stage.hard
    if hard is None:  # stage 1 ended before its ticket step: harden now
        hard = stage.draw_ticket()
        acc, _ = ctx.evaluate(net)
    bits = hard.bits()
    if c.carry_weights:
        _carry(net, model, layers)
    ctx.qat_start_epoch = epochs1
    summary = {
        "avg_bits": budget.avg_bits(bits), "target_bits": budget.target_bits,
        "budget_mb": budget.budget_mb(), "size_mb": budget.size_mb(bits),
        "search_avg_bits": stage.soft_avg, "noncontiguous": len(hard.noncontiguous),
        "budget_error": budget.rel_error(bits), "ticket_epoch": stage.t_drawn,
        "projection_fired": int(hard.projection_fired), "planes_moved": hard.projected,
        "projected": hard.projected, "stage_accuracy": acc, "stage1_accuracy": acc,
        "bits": dict(bits),
        "raw": {n: "".join(map(str, p)) for n, p in hard.raw.items()},
        "resolved": dict(hard.noncontiguous),
    }
    log.info("CSQ stage 1: bits %s (avg %.3f, target %.3f, %d planes projected, %d layers "
             "made contiguous)", bits, summary["avg_bits"], budget.target_bits, hard.projected,
             len(hard.noncontiguous))
    return bits, summary


@torch.no_grad()
def _carry(net: nn.Module, model: nn.Module, layers: dict[str, BitPlaneLayer]) -> None:
    """Copy the stage-1 state into the float model: BN, biases, pinned layers' latent weights,
    and each searched layer's reconstructed (hard-gated) weight."""
    target = model.state_dict()
    for k, v in net.state_dict().items():
        if k in target and target[k].shape == v.shape:
            target[k].copy_(v)
    for n, q in layers.items():
        model.get_submodule(n).weight.copy_(q.planes_weight())
