"""The Ray Tune trainable: one trial of the shared trainer inside a Ray worker.

It rebuilds the TrialConfig from the study's base mapping plus the sampled dotted params,
pins torch to the trial's CPUs, and reports every epoch to Tune. The last epoch's report is
held back until training returns so it can carry what only the finished run knows: the
per-layer cost records, the weight bit-widths and where the final weights were saved, plus
``qsearch_done`` — the driver's proof that the trial ran all its epochs. Workers never touch
the database: everything reaches the driver through Tune, including where each attempt ran
(``qsearch_placement``: node, pid, GPU ids, device) and, after a restart, the epoch it
resumed from (``resumed_from_epoch``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qsearch.search.searcher import TRIAL_KEY

WEIGHTS_FILE = "model.pt"
WEIGHTS_FORMAT = 1
#: Tune checks that every result carries the searcher's and scheduler's metrics; an error
#: result has no values, so it carries NaN (ASHA's rung cutoffs ignore NaN).
NAN_OBJECTIVES = {"accuracy": float("nan"), "size_mb": float("nan"),
                  "backward_cost": float("nan")}


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


def placement(device: str) -> dict[str, Any]:
    """Where this attempt runs: Ray node, worker pid, the GPUs Ray assigned, torch device."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
    except Exception:  # noqa: BLE001 - older Ray: fall back to the deprecated call
        gpus = [str(g) for g in ray.get_gpu_ids()]
    return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "gpu_ids": gpus, "device": device}


def _restore_checkpoint(local_dir: Path) -> bool:
    """Copy the trial's last Tune checkpoint (there is one after a restart) into
    ``local_dir``, where the trainer resumes from it (skipping a torn file)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        for f in Path(d).glob("ckpt-*.pt"):
            shutil.copy2(f, local_dir / f.name)
    return True


def run_trial(params: dict[str, Any], *, study: str, base: dict[str, Any], cpus: float,
              artifacts_dir: str, cache_dir: str | None) -> None:
    """Tune function trainable (bound with ``tune.with_parameters``).

    Every epoch's report carries the trainer's checkpoint of that epoch, so Ray Tune can
    restart a trial whose process or node died from where it was (``FailureConfig``). Errors
    of the trial itself are reported as a final ``qsearch_error`` result instead of raised:
    they would fail the same way again, so Tune must not spend retries on them.
    """
    import torch
    from ray import tune

    from qsearch.config import parse_trial_config, set_dotted
    from qsearch.train import resolve_device, train
    from qsearch.train.checkpoint import atomic_torch_save

    params = dict(params)
    number = int(params.pop(TRIAL_KEY))
    torch.set_num_threads(max(1, math.floor(cpus)))
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no line per epoch checkpoint
    if cache_dir:  # absolute: Tune runs each trial in its own working directory
        os.environ["QSEARCH_CACHE"] = cache_dir

    def fail(message: str, epochs: int = 0) -> None:
        tune.report({"qsearch_error": message, "qsearch_epochs_completed": epochs,
                     **NAN_OBJECTIVES})

    try:
        data = copy.deepcopy(base)
        for path, value in params.items():
            set_dotted(data, path, value)
        cfg = parse_trial_config(data)
        where = placement(str(resolve_device(cfg.device)))
    except Exception as e:  # noqa: BLE001 - reported as the trial's error message
        return fail(f"{type(e).__name__}: {e}")

    local = Path(tempfile.mkdtemp(prefix=f"qsearch-{study}-{number}-"))
    try:
        restored = _restore_checkpoint(local)
        held: list[dict[str, Any]] = []
        last_epoch = 0
        resumed_from: int | None = None  # the epoch this attempt started from (0: fresh)

        def report(metrics: dict[str, Any]) -> None:
            nonlocal last_epoch, resumed_from
            last_epoch = int(metrics["epoch"])
            if resumed_from is None:
                resumed_from = last_epoch - 1 if restored else 0
            if last_epoch >= cfg.epochs:
                held.append(metrics)  # sent below, with the layer records
                return
            out = _scalar_metrics(metrics)
            out.update(resumed_from_epoch=resumed_from, qsearch_placement=json.dumps(where))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(local)))

        try:
            result = train(cfg, report=report, checkpoint_dir=local)
        except Exception as e:  # noqa: BLE001 - one clear line reaches the study
            return fail(f"{type(e).__name__}: {e}", epochs=last_epoch)

        out_dir = trial_dir(artifacts_dir, study, number)
        weights = out_dir / WEIGHTS_FILE
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        atomic_torch_save({"format": WEIGHTS_FORMAT, "state_dict": state,
                           "weight_bits": dict(result.weight_bits),
                           "config": cfg.model_dump(mode="json")}, weights)
        final = _scalar_metrics(held[-1] if held else result.metrics)
        final.update(qsearch_done=True, qsearch_weights=str(weights),
                     resumed_from_epoch=cfg.epochs if resumed_from is None else resumed_from,
                     qsearch_layers=[row.as_dict() for row in result.layers],
                     qsearch_weight_bits=dict(result.weight_bits),
                     qsearch_placement=json.dumps(where))
        tune.report(final)
    finally:
        shutil.rmtree(local, ignore_errors=True)
