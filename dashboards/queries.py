"""Read queries the dashboard needs beyond :mod:`qsearch.store.queries`.

Same rules as there: SELECT only, one short transaction per function, plain dicts out. These
are aggregate/narrow reads that keep a 1,000-trial study page fast (the store's ``trials``
returns every column, including each trial's full config).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from qsearch.store import Store
from qsearch.store import schema as s


def study_overview(store: Store) -> dict[int, dict[str, Any]]:
    """Per study id: best value of each objective column over COMPLETE trials and the latest
    snapshot's hypervolume (two grouped queries in one transaction)."""
    t, snap = s.trials, s.pareto_snapshots
    best_q = select(t.c.study_id, func.max(t.c.accuracy), func.min(t.c.size_mb),
                    func.min(t.c.backward_cost)).where(t.c.state == "COMPLETE").group_by(
        t.c.study_id)
    last = select(snap.c.study_id, func.max(snap.c.snapshot).label("last")).group_by(
        snap.c.study_id).subquery()
    hv_q = select(snap.c.study_id, snap.c.hypervolume, snap.c.n_complete).join(
        last, (snap.c.study_id == last.c.study_id) & (snap.c.snapshot == last.c.last))
    out: dict[int, dict[str, Any]] = {}
    with store.tx("dashboard: study overview") as conn:
        for sid, acc, size, bwd in conn.execute(best_q):
            out.setdefault(sid, {})["best"] = {"accuracy": acc, "size_mb": size,
                                               "backward_cost": bwd}
        for sid, hv, n in conn.execute(hv_q):
            out.setdefault(sid, {}).update(hypervolume=hv, n_front_complete=n)
    return out


def study_trials(store: Store, study_id: int) -> list[dict[str, Any]]:
    """Every trial of a study with what the study page plots (config included: it decides
    whether a trial is a uniform-precision baseline; it is not sent to the browser)."""
    t = s.trials
    cols = [t.c.number, t.c.state, t.c.detail, t.c.params, t.c.config, t.c.accuracy,
            t.c.size_mb, t.c.backward_cost, t.c.bops, t.c.epochs_completed, t.c.max_epochs,
            t.c.started_at, t.c.finished_at]
    with store.tx("dashboard: study trials") as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(*cols).where(t.c.study_id == study_id).order_by(t.c.number))]


def study_status(store: Store, name: str) -> str | None:
    """Just the status column (the cheap check behind the live-refresh switch)."""
    with store.tx("dashboard: study status") as conn:
        return conn.execute(select(s.studies.c.status).where(s.studies.c.name == name)).scalar()
