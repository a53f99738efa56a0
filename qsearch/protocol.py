"""The trial protocol: what travels between the driver and a trial's worker, typed.

Three parties speak it — the searcher (suggests a trial, hears how it ended), the trainable
(runs it in a Ray worker) and the driver's callback (writes the store) — and Ray Tune carries
it between them as flat dicts. Every key is a named constant here and every message is a
frozen dataclass with ``to_tune``/``from_tune``, so no party spells a key by hand and a
renamed key breaks at import, not in a half-recorded study.

Messages:

* :class:`TrialAssignment` — driver to worker, inside Tune's trial ``config``: the Optuna
  trial number, the sampled params and the finished TrialConfig's dump (built once, by the
  driver; the worker only validates it).
* :class:`EpochReport` — worker to driver after every epoch but the last: the trainer's
  metrics plus where the attempt runs and the epoch it resumed from.
* :class:`FinalReport` — the last report of a trial that ran all its epochs: final metrics,
  per-layer records, weight bits and the saved weights' path. ``DONE`` marks it.
* :class:`ErrorReport` — the trial's own error (bad config, NaN loss): reported, not raised,
  so Tune spends no retries on a deterministic failure.

Torch-free and Ray-free, so the store and tests can use it anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- Tune config keys
#: Optuna trial number, in the Tune trial's config.
TRIAL_NUMBER = "_qsearch_trial"
#: The finished TrialConfig (``model_dump(mode="json")``), in the Tune trial's config.
TRIAL_CONFIG = "_qsearch_config"

# --------------------------------------------------------------------------- result keys
DONE = "qsearch_done"
ERROR = "qsearch_error"
EPOCHS_COMPLETED = "qsearch_epochs_completed"
WEIGHTS = "qsearch_weights"
LAYERS = "qsearch_layers"
WEIGHT_BITS = "qsearch_weight_bits"
PLACEMENT = "qsearch_placement"
RESUMED_FROM_EPOCH = "resumed_from_epoch"
EPOCH = "epoch"
#: Keys that are protocol, not trainer metrics (the store's epoch curves leave them out;
#: ``RESUMED_FROM_EPOCH`` stays in the curves, where it shows each restart).
PROTOCOL_KEYS = frozenset({DONE, ERROR, EPOCHS_COMPLETED, WEIGHTS, LAYERS, WEIGHT_BITS,
                           PLACEMENT})

# --------------------------------------------------------------------------- Optuna user attrs
ATTR_CONFIG = "config"
ATTR_CONFIG_ERROR = "config_error"
ATTR_DETAIL = "qsearch_detail"
ATTR_COUNTED = "qsearch_counted"
ATTR_EPOCHS_COMPLETED = "epochs_completed"
ATTR_ERROR = "error"
ATTR_PRUNED_AT = "pruned_at_epoch"
ATTR_PLACEMENTS = "placements"
ATTR_RETRIES = "qsearch_retries"
ATTR_REUSED_FROM = "qsearch_reused_from"
ATTR_FEASIBLE = "qsearch_feasible"
ATTR_CONFIG_KEY = "qsearch_config_key"
#: A study attr: the per-layer sensitivity its seeds came from (dashboards show it).
ATTR_SENSITIVITY = "qsearch_sensitivity"

Scalar = float | int | str | bool | None


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Scalar]:
    """Tune results stay small and flat: numbers and strings only (NaN kept for the record)."""
    out: dict[str, Scalar] = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class Placement:
    """Where one attempt of a trial runs."""

    node_id: str
    pid: int
    gpu_ids: tuple[str, ...]
    device: str

    def encode(self) -> str:
        return json.dumps({"node_id": self.node_id, "pid": self.pid,
                           "gpu_ids": list(self.gpu_ids), "device": self.device})

    @staticmethod
    def decode(text: str | None) -> dict[str, Any] | None:
        return json.loads(text) if text else None


@dataclass(frozen=True)
class TrialAssignment:
    """What the driver hands a worker (Tune's ``config`` of the trial)."""

    number: int
    params: dict[str, Any]
    config: dict[str, Any] | None
    config_error: str | None = None

    def to_tune(self) -> dict[str, Any]:
        out = dict(self.params)
        out[TRIAL_NUMBER] = self.number
        out[TRIAL_CONFIG] = self.config if self.config is not None else {
            "_error": self.config_error or "no config"}
        return out

    @staticmethod
    def from_tune(config: dict[str, Any]) -> TrialAssignment | None:
        """None for a Tune config that is not a qsearch trial's."""
        if not config or TRIAL_NUMBER not in config:
            return None
        cfg = config.get(TRIAL_CONFIG)
        error = cfg.get("_error") if isinstance(cfg, dict) and "_error" in cfg else None
        params = {k: v for k, v in config.items() if k not in (TRIAL_NUMBER, TRIAL_CONFIG)}
        return TrialAssignment(int(config[TRIAL_NUMBER]), params,
                               None if error else cfg, config_error=error)


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    metrics: dict[str, Scalar]
    placement: str | None = None
    resumed_from_epoch: int | None = None

    def to_tune(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics)
        out[EPOCH] = self.epoch
        if self.placement is not None:
            out[PLACEMENT] = self.placement
        if self.resumed_from_epoch is not None:
            out[RESUMED_FROM_EPOCH] = self.resumed_from_epoch
        return out


@dataclass(frozen=True)
class FinalReport(EpochReport):
    weights: str = ""
    layers: tuple[dict[str, Any], ...] = ()
    weight_bits: dict[str, int] = field(default_factory=dict)

    def to_tune(self) -> dict[str, Any]:
        out = super().to_tune()
        out.update({DONE: True, WEIGHTS: self.weights, LAYERS: list(self.layers),
                    WEIGHT_BITS: dict(self.weight_bits)})
        return out


@dataclass(frozen=True)
class ErrorReport:
    message: str
    epochs_completed: int = 0

    def to_tune(self, objective_keys: list[str]) -> dict[str, Any]:
        """Tune checks every result for the scheduler's metric: an error result carries NaN
        for each objective (ASHA's rung cutoffs ignore NaN)."""
        out: dict[str, Any] = {k: math.nan for k in objective_keys}
        out.update({ERROR: self.message, EPOCHS_COMPLETED: self.epochs_completed})
        return out


def config_key(config: dict[str, Any]) -> str:
    """Identity of a finished TrialConfig: two trials with the same key train the same thing
    (defaults filled in, so ``{}`` and ``{"w_bits": 4}`` are one config)."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]


def trainer_metrics(result: dict[str, Any], tune_keys: frozenset[str]) -> dict[str, Scalar]:
    """The trainer's own metrics in a Tune result: everything but Tune's and the protocol's
    keys, scalars only."""
    return {k: v for k, v in result.items()
            if k not in tune_keys and k not in PROTOCOL_KEYS and not k.startswith("qsearch_")
            and isinstance(v, (int, float, str, bool))}
