"""Pareto snapshots of a study: computed from the store's COMPLETE trials, written back.

Kept apart from the Tune callback so the CLI, tests and benchmark can recompute a front
exactly the way the driver does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qsearch.search.pareto import default_reference, hypervolume, knee_index, pareto_front_mask
from qsearch.store import Store, queries
from qsearch.store.queries import value_of

log = logging.getLogger(__name__)


def _number_and_values(row: Any) -> tuple[int, Mapping[str, Any]]:
    """(trial number, values by name) of a store record (``.number``/``.values``) or of a
    plain dict (``number`` plus the values as keys, or a ``values`` dict)."""
    if isinstance(row, Mapping):
        vals = row.get("values")
        return int(row["number"]), vals if isinstance(vals, Mapping) else row
    return int(row.number), row.values


def _value(values: Mapping[str, Any], name: str) -> float | None:
    v = value_of(values, name)
    return None if v is None else float(v)


def compute_front(rows: Sequence[Any], objectives: list[str], directions: list[str],
                  reference: dict[str, float] | None = None) -> dict[str, Any]:
    """Front of ``rows`` (store :class:`~qsearch.store.TrialValues`, or dicts with
    ``number`` and the values): the points (``trial_number``, ``is_knee``, ``values`` by
    objective name) with the knee flagged, the hypervolume and the reference point used.
    A row missing one of the objectives (a trial finished before the objective existed)
    cannot be placed and is left out."""
    usable = []
    for r in rows:
        number, vals = _number_and_values(r)
        v = [_value(vals, o) for o in objectives]
        if all(x is not None for x in v):
            usable.append((number, v))
    if len(usable) < len(rows):
        log.warning("%d of %d trials lack a value of %s and are left off the front",
                    len(rows) - len(usable), len(rows), ", ".join(objectives))
    if not usable:
        return {"points": [], "hypervolume": None, "reference_point": None, "n_complete": 0}
    values = np.array([v for _, v in usable], dtype=float)
    mask = pareto_front_mask(values, directions)
    front_idx = np.flatnonzero(mask)
    ref = default_reference(values, objectives, directions, reference)
    hv = hypervolume(values[front_idx], directions, ref)
    knee = int(front_idx[knee_index(values[front_idx], directions)])
    points = [{"trial_number": usable[i][0], "is_knee": bool(i == knee),
               "values": {o: float(values[i, j]) for j, o in enumerate(objectives)}}
              for i in front_idx]
    return {"points": points, "hypervolume": hv,
            "reference_point": dict(zip(objectives, ref, strict=True)),
            "n_complete": len(usable)}


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
            if r.number not in on_front and r.weights_path:
                weights = Path(r.weights_path)
                weights.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # the trial's folder, once empty
                    weights.parent.rmdir()
                dropped.append(r.number)
        store.clear_weights_path(study_id, dropped)
    return front
