"""The Ray Tune trainable: one trial of the shared trainer inside a Ray worker.

It validates the TrialConfig the driver built (it never rebuilds one from params), pins torch
to the trial's CPUs, and reports every epoch to Tune in the typed messages of
:mod:`qsearch.protocol`. The last epoch's report is held back until training returns so it
can carry what only the finished run knows: the per-layer cost records, the weight bit-widths
and where the final weights were saved, plus ``DONE`` — the driver's proof that the trial ran
all its epochs. Workers never touch the database: everything reaches the driver through Tune,
including where each attempt ran (``PLACEMENT``) and, after a restart, the epoch it resumed
from (``RESUMED_FROM_EPOCH``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsearch import protocol as P

if TYPE_CHECKING:
    from qsearch.config import TrialConfig
    from qsearch.train import TrainResult

WEIGHTS_FILE = "model.pt"
WEIGHTS_FORMAT = 1


def trial_dir(artifacts_dir: str | Path, study: str, number: int) -> Path:
    return Path(artifacts_dir) / study / f"trial-{number:05d}"


def placement(device: str) -> P.Placement:
    """Where this attempt runs: Ray node, worker pid, the GPUs Ray assigned, torch device."""
    import ray

    ctx = ray.get_runtime_context()
    gpus = tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", []))
    return P.Placement(node_id=ctx.get_node_id(), pid=os.getpid(), gpu_ids=gpus, device=device)


def _restore_checkpoint(local_dir: Path) -> bool:
    """Copy the trial's last Tune checkpoint (there is one after a restart) into
    ``local_dir``, where the trainer resumes from it (skipping a torn file)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return False
    with ckpt.as_directory() as d:
        for f in Path(d).rglob("ckpt-*.pt"):  # seed-<k>/ folders when repeats > 1
            target = local_dir / f.relative_to(d)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    return True


def repeat_summary(finals: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Mean of every numeric final metric over the seeds, and for each objective key its
    spread (``<key>.std``, population standard deviation) and each seed's value
    (``<key>.seed<k>``)."""
    out: dict[str, Any] = dict(finals[0])
    for k, v in finals[0].items():
        vals = [f.get(k) for f in finals]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                all(isinstance(x, (int, float)) for x in vals):
            out[k] = sum(vals) / len(vals)
    for k in keys:
        vals = [float(f[k]) for f in finals if isinstance(f.get(k), (int, float))]
        if len(vals) == len(finals):
            mean = sum(vals) / len(vals)
            out[f"{k}.std"] = (sum((x - mean) ** 2 for x in vals) / len(vals)) ** 0.5
            for i, x in enumerate(vals):
                out[f"{k}.seed{i}"] = x
    out["repeats"] = len(finals)
    return out


def train_with_threads(cfg: TrialConfig, threads: int, **kwargs: Any) -> TrainResult:
    """``qsearch.train.train`` with torch pinned to the trial's CPUs on the calling thread
    (OpenMP keeps the thread count per thread)."""
    import torch

    from qsearch.train import train

    torch.set_num_threads(threads)
    return train(cfg, **kwargs)


def run_trial(assignment: dict[str, Any], *, study: str, cpus: float, artifacts_dir: str,
              objective_keys: list[str], repeats: int = 1) -> None:
    """Tune function trainable (bound with ``tune.with_parameters``).

    ``assignment`` is Tune's trial config: a :class:`~qsearch.protocol.TrialAssignment` with
    the TrialConfig the driver built. Every epoch's report carries the trainer's checkpoint of
    that epoch, so Ray Tune can restart a trial whose process or node died from where it was
    (``FailureConfig``). Errors of the trial itself are reported as a final
    :class:`~qsearch.protocol.ErrorReport` instead of raised: they would fail the same way
    again, so Tune must not spend retries on them.

    With ``repeats > 1`` the config is trained with seeds ``seed .. seed+repeats-1`` one after
    the other (epoch reports come from the first seed; the spec forbids a scheduler then); the
    final report carries the mean over seeds, each seed's objective values and their spread,
    and the first seed's weights.
    """
    from ray import tune

    from qsearch.config import parse_trial_config
    from qsearch.search.training_thread import run_on_training_thread
    from qsearch.train import resolve_device
    from qsearch.train.checkpoint import atomic_torch_save

    job = P.TrialAssignment.from_tune(assignment)
    if job is None:
        raise ValueError("run_trial needs a qsearch TrialAssignment as its config")
    threads = max(1, math.floor(cpus))  # torch's, set where the training runs
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no line per epoch checkpoint

    def fail(message: str, epochs: int = 0) -> None:
        tune.report(P.ErrorReport(message, epochs).to_tune(objective_keys))

    if job.config is None:
        return fail(job.config_error or "the driver could not build this trial's config")
    try:
        cfg = parse_trial_config(job.config)
        where = placement(str(resolve_device(cfg.device))).encode()
    except Exception as e:  # noqa: BLE001 - reported as the trial's error message
        return fail(f"{type(e).__name__}: {e}")

    local = Path(tempfile.mkdtemp(prefix=f"qsearch-{study}-{job.number}-"))
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
            msg = P.EpochReport(last_epoch, P.scalar_metrics(metrics), placement=where,
                                resumed_from_epoch=resumed_from)
            tune.report(msg.to_tune(), checkpoint=tune.Checkpoint.from_directory(str(local)))

        finals: list[dict[str, Any]] = []
        try:
            # On this process's training thread, not Tune's fresh thread of each trial: its
            # memory stays mapped from trial to trial (see training_thread).
            result = run_on_training_thread(train_with_threads, cfg, threads, report=report,
                                            checkpoint_dir=local)
            for k in range(1, repeats):
                again = cfg.model_copy(update={"seed": cfg.seed + k})
                other = run_on_training_thread(train_with_threads, again, threads,
                                               checkpoint_dir=local / f"seed-{k}")
                finals.append(P.scalar_metrics(other.metrics))
        except Exception as e:  # noqa: BLE001 - one clear line reaches the study
            return fail(f"{type(e).__name__}: {e}", epochs=last_epoch)

        weights = trial_dir(artifacts_dir, study, job.number) / WEIGHTS_FILE
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        atomic_torch_save({"format": WEIGHTS_FORMAT, "state_dict": state,
                           "weight_bits": dict(result.weight_bits),
                           "config": cfg.model_dump(mode="json")}, weights)
        final = {**P.scalar_metrics(held[-1] if held else result.metrics),
                 **P.scalar_metrics(result.metrics)}
        if finals:
            final = repeat_summary([final, *finals], objective_keys)
        tune.report(P.FinalReport(
            epoch=int(final.get(P.EPOCH, cfg.epochs) or cfg.epochs), metrics=final,
            placement=where,
            resumed_from_epoch=cfg.epochs if resumed_from is None else resumed_from,
            weights=str(weights), layers=tuple(row.as_dict() for row in result.layers),
            weight_bits=dict(result.weight_bits)).to_tune())
    finally:
        shutil.rmtree(local, ignore_errors=True)
