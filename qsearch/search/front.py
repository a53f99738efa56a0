"""Pareto snapshots of a study: computed from the store's COMPLETE trials, written back.

Kept apart from the Tune callback so the CLI, tests and benchmark can recompute a front
exactly the way the driver does.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from qsearch.search.pareto import default_reference, hypervolume, knee_index, pareto_front_mask
from qsearch.store import Store, queries

log = logging.getLogger(__name__)


def compute_front(rows: list[dict[str, Any]], objectives: list[str], directions: list[str],
                  reference: dict[str, float] | None = None) -> dict[str, Any]:
    """Front of ``rows`` (dicts with ``number`` and objective values): the points with the
    knee flagged, the hypervolume and the reference point used."""
    if not rows:
        return {"points": [], "hypervolume": None, "reference_point": None, "n_complete": 0}
    values = np.array([[float(r[o]) for o in objectives] for r in rows])
    mask = pareto_front_mask(values, directions)
    front_idx = np.flatnonzero(mask)
    ref = default_reference(values, objectives, directions, reference)
    hv = hypervolume(values[front_idx], directions, ref)
    knee = int(front_idx[knee_index(values[front_idx], directions)])
    points = []
    for i in front_idx:
        p = {"trial_number": int(rows[i]["number"]), "is_knee": bool(i == knee)}
        p.update({o: float(values[i, j]) for j, o in enumerate(objectives)})
        points.append(p)
    return {"points": points, "hypervolume": hv,
            "reference_point": dict(zip(objectives, ref, strict=True)), "n_complete": len(rows)}


def update_snapshot(store: Store, study_id: int, objectives: list[str], directions: list[str],
                    trigger_trial: int | None, reference: dict[str, float] | None = None,
                    prune_weights: bool = False) -> dict[str, Any]:
    """Recompute the study's front from the store, append it as a snapshot, and (with
    ``prune_weights``) delete the saved weights of COMPLETE trials that are off the front:
    a dominated point never returns to the front, so its weights are never exported."""
    rows = queries.complete_values(store, study_id)
    front = compute_front(rows, objectives, directions, reference)
    front["snapshot"] = store.write_snapshot(
        study_id, trigger_trial=trigger_trial, n_complete=front["n_complete"],
        points=front["points"], hypervolume=front["hypervolume"],
        reference_point=front["reference_point"])
    if prune_weights:
        on_front = {p["trial_number"] for p in front["points"]}
        dropped = []
        for r in rows:
            if r["number"] not in on_front and r.get("weights_path"):
                weights = Path(r["weights_path"])
                weights.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # the trial's folder, once empty
                    weights.parent.rmdir()
                dropped.append(r["number"])
        store.clear_weights_path(study_id, dropped)
    return front
