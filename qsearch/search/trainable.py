"""The Ray Tune trainable: one trial of the shared trainer inside a Ray worker.

It rebuilds the TrialConfig from the study's base mapping plus the sampled dotted params,
pins torch to the trial's CPUs, and reports every epoch to Tune. The last epoch's report is
held back until training returns so it can carry what only the finished run knows: the
per-layer cost records, the weight bit-widths and where the final weights were saved, plus
``qsearch_done`` — the driver's proof that the trial ran all its epochs. Workers never touch
the database: everything reaches the driver through Tune.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

from qsearch.errors import TrialError
from qsearch.search.searcher import TRIAL_KEY

WEIGHTS_FILE = "model.pt"
WEIGHTS_FORMAT = 1


def trial_dir(artifacts_dir: str | Path, study: str, number: int) -> Path:
    return Path(artifacts_dir) / study / f"trial-{number:05d}"


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Tune results stay small and flat: numbers and strings only (NaN kept for the record)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, str)) or v is None:
            out[k] = v
        elif isinstance(v, float):
            out[k] = v
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def run_trial(params: dict[str, Any], *, study: str, base: dict[str, Any], cpus: float,
              artifacts_dir: str, cache_dir: str | None) -> None:
    """Tune function trainable (bound with ``tune.with_parameters``)."""
    import torch
    from ray import tune

    from qsearch.spec import parse_trial_config, set_dotted
    from qsearch.train import train
    from qsearch.train.checkpoint import atomic_torch_save

    params = dict(params)
    number = int(params.pop(TRIAL_KEY))
    torch.set_num_threads(max(1, math.floor(cpus)))
    if cache_dir:  # absolute: Tune runs each trial in its own working directory
        os.environ["QSEARCH_CACHE"] = cache_dir
    try:
        data = copy.deepcopy(base)
        for path, value in params.items():
            set_dotted(data, path, value)
        cfg = parse_trial_config(data)
    except Exception as e:  # noqa: BLE001 - reported as the trial's error message
        raise TrialError(f"{type(e).__name__}: {e}") from None

    held: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any]) -> None:
        if int(metrics["epoch"]) >= cfg.epochs:
            held.append(metrics)  # sent below, with the layer records
            return
        tune.report(_scalar_metrics(metrics))

    try:
        result = train(cfg, report=report)
    except Exception as e:  # noqa: BLE001 - one clear line reaches the study, not a traceback
        raise TrialError(f"{type(e).__name__}: {e}") from None

    out_dir = trial_dir(artifacts_dir, study, number)
    weights = out_dir / WEIGHTS_FILE
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    atomic_torch_save({"format": WEIGHTS_FORMAT, "state_dict": state,
                       "weight_bits": dict(result.weight_bits),
                       "config": cfg.model_dump(mode="json")}, weights)
    final = _scalar_metrics(held[-1] if held else result.metrics)
    final.update(qsearch_done=True, qsearch_weights=str(weights),
                 qsearch_layers=[row.as_dict() for row in result.layers],
                 qsearch_weight_bits=dict(result.weight_bits))
    tune.report(final)
