"""Which marker each trial gets on a front plot, from plain trial rows (no plotting here).

Why a separate step: a trial can be on the front, dominated, a uniform-precision baseline,
infeasible (it violated a constraint), a reused result (a duplicate config that took an
earlier trial's values), or stopped early (PRUNED, FAIL). Only feasible trials that ran
their own config may be front points or dominated points; the others are drawn apart, each
kind with its own legend entry, so nobody reads an infeasible or duplicated point as a
candidate. PRUNED and FAIL trials have no final values: they are placed at the values of
their last reported epoch (their last rung) and say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qsearch.store import ObjectiveInfo
from qsearch.store.queries import value_of


def v(row: dict[str, Any], name: str) -> float | None:
    return value_of(row.get("values") or {}, name)


@dataclass
class Groups:
    front: list[dict[str, Any]] = field(default_factory=list)
    dominated: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    infeasible: list[dict[str, Any]] = field(default_factory=list)
    reused: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def plotted(self) -> list[dict[str, Any]]:
        """Every row that gets a marker (for axis ranges)."""
        return (self.front + self.dominated + self.infeasible + self.reused + self.pruned
                + self.failed)

    def candidates(self) -> list[dict[str, Any]]:
        return self.front + self.dominated


def tag(t: dict[str, Any]) -> str:
    parts = []
    if t.get("is_knee"):
        parts.append("knee")
    if t.get("on_front"):
        parts.append("Pareto")
    if t.get("baseline"):
        parts.append(f"baseline {t['baseline']}")
    if t.get("repeats"):
        parts.append(f"mean of {t['repeats']} seeds")
    return ", ".join(parts)


def ending(t: dict[str, Any]) -> str:
    """How a trial ended, in words (``PRUNED at epoch 1 of 3 (its last rung)``), from a row
    with ``state``, ``last_epoch``, ``max_epochs`` and for COMPLETE ones ``reused_from`` and
    ``feasible``."""
    of = f" of {t['max_epochs']}" if t.get("max_epochs") else ""
    at = t.get("last_epoch") or 0
    state = t["state"]
    if state == "PRUNED":
        return f"PRUNED at epoch {at}{of} (its last rung)"
    if state == "FAIL":
        return f"FAILED at epoch {at}{of}" if at else "FAILED before its first epoch"
    if state == "RUNNING":
        return f"RUNNING, epoch {at}{of} reported"
    if t.get("reused_from") is not None:
        return f"COMPLETE: reused trial #{t['reused_from']}'s result (same config)"
    if t.get("feasible") is False:
        return "COMPLETE but INFEASIBLE (violates a constraint)"
    return "COMPLETE"


def stopped_tag(t: dict[str, Any]) -> str:
    """``PRUNED at epoch 1 of 3 (its last rung): values of that epoch, not final``."""
    return f"{ending(t)}: values of that epoch, not final"


def _has(row: dict[str, Any], objectives: Sequence[ObjectiveInfo]) -> bool:
    return all(v(row, o.name) is not None for o in objectives)


def _better(o: ObjectiveInfo, x: float) -> float:
    return -x if o.direction == "maximize" else x


def classify(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
             objectives: Sequence[ObjectiveInfo]) -> Groups:
    """Rows per marker kind. ``front`` (stored or re-drawn) decides the front; every other
    COMPLETE trial with all axis values is dominated unless infeasible or reused."""
    g = Groups()
    by_number = {int(t["number"]): t for t in trials}
    for p in front:
        t = by_number.get(int(p["trial_number"]), {})
        row = {"number": int(p["trial_number"]), "values": p["values"],
               "is_knee": bool(p.get("is_knee")), "on_front": True,
               "baseline": t.get("baseline"), "spread": t.get("spread") or {},
               "repeats": t.get("repeats")}
        row["tag"] = tag(row)
        g.front.append(row)
    on_front = {r["number"] for r in g.front}
    for t in trials:
        n = int(t["number"])
        if n in on_front:
            continue
        if t["state"] == "COMPLETE" and _has(t, objectives):
            row = {**t, "on_front": False, "is_knee": False}
            if t.get("feasible") is False:
                g.infeasible.append({**row, "tag": "infeasible: violates a constraint "
                                                   "(never on the front)"})
            elif t.get("reused_from") is not None:
                g.reused.append({**row, "tag": f"reused trial #{t['reused_from']}'s result "
                                               "(same config; never on the front)"})
            else:
                g.dominated.append({**row, "tag": tag(row)})
        elif t["state"] in ("PRUNED", "FAIL") and t.get("last_epoch"):
            row = {**t, "values": t.get("rung") or {}, "tag": stopped_tag(t)}
            if _has(row, objectives):
                (g.pruned if t["state"] == "PRUNED" else g.failed).append(row)
    # One marker per bit-width pair: the best plain-LSQ run at that precision (first
    # objective, then second), i.e. the baseline a mixed-precision or method point must beat.
    best: dict[str, dict[str, Any]] = {}

    def key(r: dict[str, Any]) -> tuple[float, ...]:
        return tuple(_better(o, v(r, o.name) or 0.0) for o in objectives[:2])

    for r in g.candidates():
        lab = r.get("baseline")
        if lab and (lab not in best or key(r) < key(best[lab])):
            best[lab] = r
    x = objectives[1].name if len(objectives) > 1 else objectives[0].name
    g.baselines = sorted(best.values(), key=lambda r: v(r, x) or 0.0)
    return g
