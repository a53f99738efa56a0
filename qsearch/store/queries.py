"""Read-only queries over the qsearch tables, for the CLI, export and dashboards.

Every function takes a :class:`~qsearch.store.Store` and returns plain dicts/lists (JSON-able
apart from datetimes). None of them writes, so a dashboard may call them while a driver is
running, and each is retried as a whole on transient errors (``store.retries`` times), like
the store's own methods: the driver reads the front through them mid-study.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from qsearch.errors import ConfigError, StorageError
from qsearch.store import schema as s
from qsearch.store.store import Store, StudyRecord, retried

TRIAL_STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL")


def _rows(result: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


@retried  # the store is the first argument, as for its methods
def require_study(store: Store, name: str) -> StudyRecord:
    """The study named ``name`` or a ConfigError listing the known studies."""
    if not store.has_schema():
        raise StorageError(f"database {store.masked_url} has no qsearch studies "
                           "(no qsearch tables); launch a study first")
    rec = store.get_study(name)
    if rec is None:
        known = [st["name"] for st in list_studies(store)]
        raise ConfigError("study", f"no study named {name!r} in {store.masked_url}"
                          + (f"; known studies: {', '.join(known)}" if known else ""))
    return rec


@retried
def list_studies(store: Store) -> list[dict[str, Any]]:
    """Every study with its status, lease holder and trial counts per state."""
    with store.tx("list studies") as conn:
        studies = _rows(conn.execute(select(
            s.studies.c.id, s.studies.c.name, s.studies.c.status, s.studies.c.objectives,
            s.studies.c.directions, s.studies.c.spec_hash, s.studies.c.created_at,
            s.studies.c.finished_at, s.studies.c.lease_host, s.studies.c.lease_pid,
            s.studies.c.lease_heartbeat_at).order_by(s.studies.c.id)))
        counts = conn.execute(select(s.trials.c.study_id, s.trials.c.state, func.count()).group_by(
            s.trials.c.study_id, s.trials.c.state)).all()
    by_study: dict[int, dict[str, int]] = {}
    for sid, state, n in counts:
        by_study.setdefault(sid, {})[state] = int(n)
    for st in studies:
        c = by_study.get(st["id"], {})
        st["trials"] = {state: c.get(state, 0) for state in TRIAL_STATES}
        st["n_trials"] = sum(c.values())
    return studies


@retried
def trials(store: Store, study: str, states: list[str] | None = None) -> list[dict[str, Any]]:
    """Trials of a study with their state, params, config, final objective values."""
    rec = require_study(store, study)
    q = select(s.trials).where(s.trials.c.study_id == rec.id)
    if states:
        q = q.where(s.trials.c.state.in_(states))
    with store.tx("list trials") as conn:
        return _rows(conn.execute(q.order_by(s.trials.c.number)))


@retried
def trial(store: Store, study: str, number: int) -> dict[str, Any]:
    rec = require_study(store, study)
    with store.tx("read trial") as conn:
        row = conn.execute(select(s.trials).where(
            s.trials.c.study_id == rec.id, s.trials.c.number == number)).first()
    if row is None:
        raise ConfigError("trial", f"study {study!r} has no trial {number}")
    return dict(row._mapping)


@retried
def epoch_metrics(store: Store, study: str, trial_number: int | None = None) -> list[dict[str, Any]]:
    """Per-epoch reports (learning curves), ordered by trial then epoch."""
    rec = require_study(store, study)
    q = select(s.epoch_metrics).where(s.epoch_metrics.c.study_id == rec.id)
    if trial_number is not None:
        q = q.where(s.epoch_metrics.c.trial_number == trial_number)
    with store.tx("read epoch metrics") as conn:
        return _rows(conn.execute(q.order_by(s.epoch_metrics.c.trial_number,
                                             s.epoch_metrics.c.epoch)))


@retried
def layer_records(store: Store, study: str, trial_number: int) -> list[dict[str, Any]]:
    """Per-layer precision/cost records of a finished trial, in layer order."""
    rec = require_study(store, study)
    with store.tx("read layer records") as conn:
        return _rows(conn.execute(select(s.layers).where(
            s.layers.c.study_id == rec.id, s.layers.c.trial_number == trial_number).order_by(
            s.layers.c.idx)))


@retried
def pareto_snapshots(store: Store, study: str) -> list[dict[str, Any]]:
    """The hypervolume history: one row per snapshot, oldest first."""
    rec = require_study(store, study)
    with store.tx("read pareto snapshots") as conn:
        return _rows(conn.execute(select(s.pareto_snapshots).where(
            s.pareto_snapshots.c.study_id == rec.id).order_by(s.pareto_snapshots.c.snapshot)))


@retried
def pareto_front(store: Store, study: str, snapshot: int | None = None
                 ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(snapshot row, its points) for ``snapshot`` or the latest; (None, []) before any."""
    rec = require_study(store, study)
    with store.tx("read pareto front") as conn:
        q = select(s.pareto_snapshots).where(s.pareto_snapshots.c.study_id == rec.id)
        q = q.where(s.pareto_snapshots.c.snapshot == snapshot) if snapshot is not None else \
            q.order_by(s.pareto_snapshots.c.snapshot.desc()).limit(1)
        snap = conn.execute(q).first()
        if snap is None:
            return None, []
        points = _rows(conn.execute(select(s.pareto_points).where(
            s.pareto_points.c.study_id == rec.id,
            s.pareto_points.c.snapshot == snap.snapshot).order_by(
            s.pareto_points.c.trial_number)))
    return dict(snap._mapping), points


@retried
def complete_values(store: Store, study_id: int) -> list[dict[str, Any]]:
    """Objective values of every COMPLETE trial (the input of a Pareto snapshot)."""
    with store.tx("read complete trials") as conn:
        return _rows(conn.execute(select(
            s.trials.c.number, s.trials.c.accuracy, s.trials.c.size_mb, s.trials.c.backward_cost,
            s.trials.c.weights_path).where(
            s.trials.c.study_id == study_id, s.trials.c.state == "COMPLETE").order_by(
            s.trials.c.number)))
