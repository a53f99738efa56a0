"""Per-layer sensitivity of the warm-started model, and search seeds that spend bits on it.

**Sensitivity** (HAWQ-v2 style). For each quantizable layer ``l`` with weights ``W_l`` (``n_l``
of them) the trace of the Hessian block of the training loss, ``tr(H_l)``, is estimated with
Hutchinson's estimator: ``E[v^T H v]`` over Rademacher probes ``v``. One Hessian-vector
product (double backward) per probe gives every layer's estimate at once, since the cross
terms ``v_l^T H_lm v_m`` of independent per-layer probes vanish in expectation. Default: 4
probes on each of 2 training batches (no augmentation, the model in eval mode, i.e. BN
running statistics), the estimates averaged.

The value :func:`layer_sensitivity` returns per layer is ``tr(H_l) * mean(W_l^2)``: the
second-order loss increase per unit of *relative* weight noise. Quantizing ``W_l`` at ``b``
bits adds noise of relative power ``r(b) = |Q_b(W) - W|^2 / |W|^2`` (:func:`relative_noise`,
LSQ's initial step ``2 mean|W| / sqrt(Qp)`` on a unit Gaussian), so the predicted loss
increase is ``ΔL_l(b) ≈ ½ · sensitivity_l · r(b)`` (negative traces are clamped to 0).

It is computed once per (model, dataset, warm-start recipe, data, seed, batch size; the
warm start's own cache key) plus the estimator's settings, and cached as JSON under
``<cache root>/sensitivity/`` (the warm start's cache root,
:func:`qsearch.config.defaults.cache_root`), behind a file lock like the warm start. With the
warm start disabled it is the sensitivity of the freshly initialised model trials start from.

**Seeds** (:func:`seed_configs`): for a few average-weight-bit budgets, a HAWQ-style greedy
starts every searched layer at its lowest allowed bits and repeatedly raises the layer whose
next allowed bit-width buys the largest predicted loss reduction per added bit of model size
(``½ s_l (r(b) - r(b')) / (n_l (b' - b))``) while the parameter-weighted average stays within
the budget. Each seed sets the spec's per-layer ``layers.<name>.w_bits`` dimensions to values
those dimensions allow; any other searched dimension is left to the sampler.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import heapq
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsearch.config import CategoricalDist, FloatDist, IntDist, StudySpec
from qsearch.config.defaults import cache_root
from qsearch.errors import ConfigError
from qsearch.search.expand import layer_params, split_layer_key

if TYPE_CHECKING:
    from qsearch.config import TrialConfig

log = logging.getLogger(__name__)

SENSITIVITY_VERSION = 1
DEFAULT_PROBES = 4
DEFAULT_BATCHES = 2


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    trace: float  # Hutchinson estimate of tr(H_l)
    trace_std: float  # standard error of that estimate over probes and batches
    n_params: int
    mean_sq_weight: float
    sensitivity: float  # max(trace, 0) * mean(W^2)


@dataclass(frozen=True)
class SensitivityProfile:
    layers: dict[str, LayerSensitivity]
    path: Path
    computed_now: bool
    seconds: float  # time it took to compute (0 for a cache hit... as stored: the first time)
    probes: int
    batches: int
    warm_start: bool

    def as_dict(self) -> dict[str, float]:
        return {k: v.sensitivity for k, v in self.layers.items()}


def cache_path(cfg: TrialConfig, probes: int = DEFAULT_PROBES,
               batches: int = DEFAULT_BATCHES) -> Path:
    """Where the sensitivity of ``cfg``'s warm-started model is cached."""
    from qsearch.train.warmstart import cache_key

    blob = json.dumps({"v": SENSITIVITY_VERSION, "warm": cache_key(cfg),
                       "enabled": cfg.warm_start.enabled, "probes": probes,
                       "batches": batches, "estimator": "hutchinson"}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return cache_root(cfg.warm_start.cache_dir) / "sensitivity" / f"{cfg.model}-{cfg.dataset}-{key}.json"


def _compute(cfg: TrialConfig, probes: int, batches: int) -> dict[str, LayerSensitivity]:
    import torch
    import torch.nn.functional as F

    from qsearch.data import iterate_batches, load_dataset
    from qsearch.models import build_model
    from qsearch.quant.precision import QUANTIZABLE
    from qsearch.train.trainer import resolve_device, seed_everything
    from qsearch.train.warmstart import load_or_train

    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    if cfg.warm_start.enabled:
        model.load_state_dict(load_or_train(cfg, data, device).state_dict)
    model = model.to(device).eval()
    named = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    params = [w for _, w in named]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + 17)
    samples: list[list[float]] = [[] for _ in named]
    for i, (x, y) in enumerate(iterate_batches(data, "train", cfg.batch_size, shuffle=False)):
        if i >= batches:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(probes):
            vs = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).float() * 2 - 1
                   ).to(device) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for j, (v, hv) in enumerate(zip(vs, hvs)):
                samples[j].append(float((v * hv).sum()))
    out: dict[str, LayerSensitivity] = {}
    for (name, w), s in zip(named, samples):
        k = len(s)
        mean = sum(s) / k
        std = math.sqrt(sum((a - mean) ** 2 for a in s) / (k - 1) / k) if k > 1 else 0.0
        msq = float((w.detach() ** 2).mean())
        out[name] = LayerSensitivity(name, mean, std, int(w.numel()), msq, max(mean, 0.0) * msq)
    return out


def sensitivity_profile(cfg: TrialConfig, *, probes: int = DEFAULT_PROBES,
                        batches: int = DEFAULT_BATCHES) -> SensitivityProfile:
    """The cached per-layer sensitivity record of ``cfg``'s (warm-started) model; computed
    (and the warm start trained, if it is not cached either) on the first call."""
    if probes < 1 or batches < 1:
        raise ConfigError("sensitivity", "needs at least one probe and one batch")
    path = cache_path(cfg, probes, batches)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                blob = json.loads(path.read_text())
                layers = {r["layer"]: LayerSensitivity(**r) for r in blob["layers"]}
                return SensitivityProfile(layers, path, False, float(blob["seconds"]),
                                          probes, batches, bool(blob["warm_start"]))
            except Exception as e:  # noqa: BLE001 - a torn cache file is recomputed
                log.warning("sensitivity cache %s unreadable (%s); recomputing", path, e)
        t0 = time.perf_counter()
        layers = _compute(cfg, probes, batches)
        seconds = time.perf_counter() - t0
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({
            "version": SENSITIVITY_VERSION, "estimator": "hutchinson", "probes": probes,
            "batches": batches, "warm_start": cfg.warm_start.enabled, "seconds": seconds,
            "model": cfg.model, "dataset": cfg.dataset,
            "layers": [asdict(v) for v in layers.values()]}, indent=1))
        os.replace(tmp, path)
        log.info("per-layer sensitivity of %s/%s in %.1f s -> %s", cfg.model, cfg.dataset,
                 seconds, path)
        return SensitivityProfile(layers, path, True, seconds, probes, batches,
                                  cfg.warm_start.enabled)


def layer_sensitivity(cfg: TrialConfig, *, probes: int = DEFAULT_PROBES,
                      batches: int = DEFAULT_BATCHES) -> dict[str, float]:
    """Layer name -> sensitivity (``max(tr H_l, 0) * mean(W_l^2)``, see the module
    docstring) of ``cfg``'s warm-started model, in forward order; cached on disk."""
    return sensitivity_profile(cfg, probes=probes, batches=batches).as_dict()


# --------------------------------------------------------------------------- seeds


@functools.lru_cache(maxsize=None)
def relative_noise(bits: int) -> float:
    """``|Q_b(w) - w|^2 / |w|^2`` of signed b-bit LSQ at its initial step on a unit Gaussian
    (deterministic sample); 0 at 32 bits (not quantized)."""
    if bits >= 32:
        return 0.0
    import numpy as np

    w = np.random.default_rng(0).standard_normal(1 << 16)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s = 2 * np.abs(w).mean() / math.sqrt(qp)
    q = np.clip(np.round(w / s), -qn, qp) * s
    return float(((q - w) ** 2).sum() / (w**2).sum())


def bit_choices(dist: Any, field: str = "") -> list[int] | None:
    """The bit-widths a searched dimension allows, ascending (None: not a bits dimension)."""
    if isinstance(dist, CategoricalDist):
        vals = [c for c in dist.choices if isinstance(c, int) and not isinstance(c, bool)]
        return sorted(vals) if len(vals) == len(dist.choices) else None
    if isinstance(dist, IntDist):
        if dist.log:
            raise ConfigError(field, "a log-scale bits range cannot be seeded; use a "
                              "categorical or a plain int range")
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDist):
        return None
    return None


def seeded_dimensions(spec: StudySpec) -> dict[str, tuple[str, list[int]]]:
    """path -> (layer, allowed bits) for every searched ``layers.<name>.w_bits`` dimension
    of an (expanded) spec."""
    out: dict[str, tuple[str, list[int]]] = {}
    for path, dist in spec.searched().items():
        k = split_layer_key(path)
        if k is None or k[1] != "w_bits":
            continue
        choices = bit_choices(dist, f"search_space.{path}")
        if choices:
            out[path] = (k[0], choices)
    return out


def default_budgets(lo: float, hi: float, n: int) -> list[float]:
    """n average-bit budgets in (lo, hi), denser at the low end where fronts are decided:
    ``lo + (hi - lo) * ((k + 1) / (n + 1))^2``."""
    return [lo + (hi - lo) * ((k + 1) / (n + 1)) ** 2 for k in range(n)]


def allocate(sensitivity: dict[str, float], params: dict[str, int],
             choices: dict[str, list[int]], budget: float) -> dict[str, int]:
    """Greedy HAWQ-style allocation: layer -> bits with ``sum n_l b_l / sum n_l <= budget``
    (at least every layer's lowest choice), highest predicted loss reduction per added bit."""
    bits = {layer: c[0] for layer, c in choices.items()}
    total = sum(params[layer] for layer in choices)
    spent = sum(params[layer] * bits[layer] for layer in choices)
    cap = budget * total + 1e-9
    heap: list[tuple[float, int, str, int]] = []

    def push(layer: str, i: int) -> None:
        c = choices[layer]
        if i + 1 >= len(c):
            return
        b, b2 = c[i], c[i + 1]
        gain = 0.5 * sensitivity[layer] * (relative_noise(b) - relative_noise(b2))
        per_bit = gain / (params[layer] * (b2 - b))
        # ties (e.g. zero sensitivity) go to the smaller layer, then model order
        heapq.heappush(heap, (-per_bit, params[layer], layer, i))

    order = {layer: j for j, layer in enumerate(choices)}
    for layer in choices:
        push(layer, 0)
    while heap:
        _, _, layer, i = heapq.heappop(heap)
        c = choices[layer]
        extra = params[layer] * (c[i + 1] - c[i])
        if spent + extra > cap:
            continue  # this step does not fit; cheaper steps of other layers still may
        bits[layer] = c[i + 1]
        spent += extra
        push(layer, i + 1)
    return dict(sorted(bits.items(), key=lambda kv: order[kv[0]]))


def seed_configs(spec: StudySpec, sensitivity: dict[str, float], n: int,
                 budgets: list[float] | None = None) -> list[dict[str, int]]:
    """Up to ``n`` distinct per-layer bit assignments ``{layers.<name>.w_bits: bits}`` for
    an *expanded* spec (:func:`~qsearch.search.expand.expand_search_space`), one per
    average-bit budget (default :func:`default_budgets` between the lowest and highest
    allowed bits), lowest budget first. Only the per-layer ``w_bits`` dimensions are set
    (for ``study.enqueue_trial(params)``: the sampler fills in the rest)."""
    if n < 1:
        return []
    dims = seeded_dimensions(spec)
    if not dims:
        raise ConfigError("sampler.sensitivity", "needs per-layer weight-bit dimensions in the "
                          "search space (e.g. layers.*.w_bits: {type: int, low: 2, high: 8}); "
                          "expand the spec's patterns first")
    missing = [layer for layer, _ in dims.values() if layer not in sensitivity]
    if missing:
        raise ConfigError("sampler.sensitivity", f"no sensitivity for layer(s) "
                          f"{', '.join(missing)} (known: {', '.join(sensitivity)})")
    sizes = layer_params(spec)
    choices = {layer: c for layer, c in dims.values()}
    path_of = {layer: path for path, (layer, _) in dims.items()}
    lo = min(c[0] for c in choices.values())
    hi = max(c[-1] for c in choices.values())
    out: list[dict[str, int]] = []
    seen: set[tuple[int, ...]] = set()
    for budget in budgets if budgets is not None else default_budgets(lo, hi, n):
        bits = allocate(sensitivity, sizes, choices, budget)
        key = tuple(bits.values())
        if key in seen:
            continue
        seen.add(key)
        out.append({path_of[layer]: b for layer, b in bits.items()})
        if len(out) >= n:
            break
    return out


def predicted_loss_increase(sensitivity: dict[str, float], bits: dict[str, int]) -> float:
    """``sum_l ½ s_l r(b_l)`` for layer -> bits (the quantity the greedy trades off)."""
    return sum(0.5 * sensitivity[layer] * relative_noise(b) for layer, b in bits.items())
