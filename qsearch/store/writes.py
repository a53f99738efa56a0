"""Every write the study driver makes: studies, trials, epochs, layers, Pareto snapshots.

Each function is one transaction, retried as a whole on transient errors. An error before
the commit rolls everything back, so the retry starts clean; after an ambiguous commit (the
connection died during COMMIT) the repeat is harmless for the idempotent writes (trial rows,
values, epochs) and at worst adds one retry count or one duplicate Pareto snapshot.

Values are written by name (``qsearch_trial_values``, ``qsearch_pareto_values``): every
name the objective registry knows (reported-only ones such as ``test_accuracy`` too), plus
the old value columns' names, which are also still written to those columns for older
readers. :func:`objective_values` picks them out of a trial's final metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from qsearch.config import objectives as registry
from qsearch.errors import StorageError
from qsearch.store import schema as s
from qsearch.store.engine import Database, retried, utcnow
from qsearch.store.queries import StudyRecord, get_study

#: Epoch metrics that also have a column of their own (the rest live in the JSON).
EPOCH_COLUMNS = ("accuracy", "size_mb", "backward_cost", "bops", "train_loss", "test_loss",
                 "wall_s")


def finite(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON: numbers stay numbers, NaN/inf become None, others become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = v if isinstance(v, int) else finite(v)
        else:
            out[k] = str(v)
    return out


def storable_name(name: str) -> bool:
    """Whether a value of this name is stored: a registered objective (or one of its old
    names) or one of the schema-v2 value columns."""
    return registry.resolve_name(name) in registry.objective_names() \
        or name in s.LEGACY_TRIAL_VALUES


def objective_values(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The storable values of a trial's final metrics, by objective name: every registered
    objective whose ``metric_key`` the metrics carry, plus the old value columns' names."""
    out: dict[str, float | None] = {}
    for o in registry.objectives():
        if o.metric_key in metrics:
            out[o.name] = finite(metrics[o.metric_key])
    for name in s.LEGACY_TRIAL_VALUES:
        if name in metrics and name not in out:
            out[name] = finite(metrics[name])
    return out


def _named(values: Mapping[str, Any]) -> dict[str, float | None]:
    """The storable, numeric entries of ``values`` (None for a non-finite number)."""
    return {k: finite(v) for k, v in values.items()
            if storable_name(k) and (v is None or (isinstance(v, (int, float))
                                                   and not isinstance(v, bool)))}


# ----------------------------------------------------------------------------- studies


@retried
def create_or_get_study(db: Database, name: str, *, spec_yaml: str, spec_hash: str,
                        search_hash: str, objectives: list[str], directions: list[str],
                        artifacts_dir: str) -> tuple[StudyRecord, bool]:
    """The study row, created if missing; ``(record, created)``. Two drivers creating the
    same study at once: the unique name makes one insert fail, and it reads the row."""
    existing = get_study(db, name)
    if existing is not None:
        return existing, False
    now = utcnow()
    try:
        with db.tx("create study") as conn:
            conn.execute(s.studies.insert().values(
                name=name, spec_yaml=spec_yaml, spec_hash=spec_hash, search_hash=search_hash,
                objectives=list(objectives), directions=list(directions), status="created",
                artifacts_dir=artifacts_dir, created_at=now, updated_at=now))
    except StorageError as e:
        if not isinstance(e.__cause__, IntegrityError):
            raise
    rec = get_study(db, name)
    if rec is None:  # pragma: no cover - deleted between insert and read
        raise StorageError(f"study {name!r} vanished from {db.masked_url}")
    return rec, rec.created_at == now


@retried
def update_spec(db: Database, study_id: int, spec_yaml: str, spec_hash: str) -> None:
    with db.tx("update study spec") as conn:
        conn.execute(update(s.studies).where(s.studies.c.id == study_id).values(
            spec_yaml=spec_yaml, spec_hash=spec_hash, updated_at=utcnow()))


@retried
def set_status(db: Database, study_id: int, status: str, finished: bool = False) -> None:
    now = utcnow()
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if finished:
        values["finished_at"] = now
    with db.tx("set study status") as conn:
        conn.execute(update(s.studies).where(s.studies.c.id == study_id).values(**values))


# ----------------------------------------------------------------------------- trials


@retried
def trial_started(db: Database, study_id: int, number: int, *, optuna_trial_id: int | None,
                  params: dict[str, Any], config: dict[str, Any], max_epochs: int) -> None:
    """A trial (re)started. A restart after a failure keeps its epochs and retry count."""
    where = (s.trials.c.study_id == study_id, s.trials.c.number == number)
    values = {"optuna_trial_id": optuna_trial_id, "state": "RUNNING",
              "params": jsonable(params), "config": config, "max_epochs": max_epochs}
    with db.tx("record trial start") as conn:
        res = conn.execute(update(s.trials).where(*where).values(**values))
        if res.rowcount == 0:
            conn.execute(s.trials.insert().values(
                study_id=study_id, number=number, counted=False, epochs_completed=0,
                retries=0, started_at=utcnow(), **values))


@retried
def trial_retried(db: Database, study_id: int, number: int) -> int:
    """Count one restart of a trial whose process or node died; returns the new count."""
    where = (s.trials.c.study_id == study_id, s.trials.c.number == number)
    with db.tx("record trial retry") as conn:
        conn.execute(update(s.trials).where(*where).values(retries=s.trials.c.retries + 1))
        return int(conn.execute(select(s.trials.c.retries).where(*where)).scalar() or 0)


@retried
def set_placement(db: Database, study_id: int, number: int, placement: dict[str, Any]) -> None:
    """Where the trial's current attempt runs (node, pid, GPU ids, device)."""
    with db.tx("record trial placement") as conn:
        conn.execute(update(s.trials).where(
            s.trials.c.study_id == study_id, s.trials.c.number == number).values(
            placement=placement))


def _epoch_row(study_id: int, number: int, metrics: Mapping[str, Any],
               created_at: datetime) -> dict[str, Any]:
    return {"study_id": study_id, "trial_number": number, "epoch": int(metrics["epoch"]),
            "metrics": jsonable(metrics), "created_at": created_at,
            **{k: finite(metrics.get(k)) for k in EPOCH_COLUMNS}}


@retried
def record_epoch(db: Database, study_id: int, number: int, metrics: dict[str, Any]) -> None:
    """Store one epoch's report (idempotent: a repeated epoch replaces the row)."""
    row = _epoch_row(study_id, number, metrics, utcnow())
    e = s.epoch_metrics
    with db.tx("record epoch metrics") as conn:
        conn.execute(delete(e).where(e.c.study_id == study_id, e.c.trial_number == number,
                                     e.c.epoch == row["epoch"]))
        conn.execute(e.insert().values(**row))
        conn.execute(update(s.trials).where(
            s.trials.c.study_id == study_id, s.trials.c.number == number,
            s.trials.c.state == "RUNNING").values(epochs_completed=row["epoch"]))


def _layer_rows(study_id: int, number: int, layers: Sequence[Mapping[str, Any]]
                ) -> list[dict[str, Any]]:
    return [{"study_id": study_id, "trial_number": number, "idx": i, "name": r["name"],
             "kind": r.get("kind"), "params": int(r["params"]), "macs": int(r["macs"]),
             "w_bits": int(r["w_bits"]), "a_bits": int(r["a_bits"]),
             "g_bits": int(r.get("g_bits", 32)),
             "frozen_fraction": float(r.get("frozen_fraction", 0.0))}
            for i, r in enumerate(layers)]


def _replace_values(conn: Connection, study_id: int, number: int,
                    named: Mapping[str, float | None]) -> None:
    v = s.trial_values
    conn.execute(delete(v).where(v.c.study_id == study_id, v.c.trial_number == number))
    if named:
        conn.execute(v.insert(), [{"study_id": study_id, "trial_number": number, "name": k,
                                   "value": x} for k, x in named.items()])


@retried
def trial_finished(db: Database, study_id: int, number: int, *, state: str, detail: str,
                   counted: bool, values: Mapping[str, Any] | None = None,
                   epochs_completed: int | None = None, error: str | None = None,
                   layers: list[dict[str, Any]] | None = None,
                   weights_path: str | None = None, feasible: bool | None = None,
                   reused_from: int | None = None) -> None:
    """Final state of a trial, its values by name and its per-layer records.

    ``values``: the trial's values by objective name (see :func:`objective_values`); the
    storable ones replace whatever the trial had. None keeps the stored values.
    ``feasible=False`` marks a trial that violates the study's constraints; ``reused_from``
    a trial that reused an earlier trial's result (same config). Neither is on a front."""
    upd: dict[str, Any] = {"state": state, "detail": detail, "counted": counted,
                           "error": error, "weights_path": weights_path,
                           "finished_at": utcnow(), "feasible": feasible,
                           "reused_from": reused_from}
    named = _named(values) if values is not None else None
    if named is not None:
        upd.update({k: named.get(k) for k in s.LEGACY_TRIAL_VALUES})
    if epochs_completed is not None:
        upd["epochs_completed"] = epochs_completed
    with db.tx("record trial end") as conn:
        res = conn.execute(update(s.trials).where(
            s.trials.c.study_id == study_id, s.trials.c.number == number).values(**upd))
        if res.rowcount == 0:
            conn.execute(s.trials.insert().values(
                study_id=study_id, number=number, started_at=utcnow(),
                epochs_completed=upd.pop("epochs_completed", 0) or 0, **upd))
        if named is not None:
            _replace_values(conn, study_id, number, named)
        if layers:
            conn.execute(delete(s.layers).where(s.layers.c.study_id == study_id,
                                                s.layers.c.trial_number == number))
            conn.execute(s.layers.insert(), _layer_rows(study_id, number, layers))


@retried
def clear_weights_path(db: Database, study_id: int, numbers: list[int]) -> None:
    if not numbers:
        return
    with db.tx("forget pruned weights") as conn:
        conn.execute(update(s.trials).where(
            s.trials.c.study_id == study_id, s.trials.c.number.in_(numbers)).values(
            weights_path=None))


# ----------------------------------------------------------------------------- pareto


def point_values(p: Mapping[str, Any]) -> dict[str, float | None]:
    """A front point's values: its ``values`` dict, or (older callers) its flat keys."""
    if isinstance(p.get("values"), Mapping):
        return {k: finite(v) for k, v in p["values"].items()}
    return {k: finite(v) for k, v in p.items()
            if k not in ("trial_number", "is_knee", "params", "values", "reported")}


def _point_rows(study_id: int, snap: int, points: Sequence[Mapping[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, value_rows = [], []
    for p in points:
        n = int(p["trial_number"])
        vals = point_values(p)
        rows.append({"study_id": study_id, "snapshot": snap, "trial_number": n,
                     "is_knee": bool(p.get("is_knee", False)),
                     **{k: vals.get(k) for k in s.LEGACY_POINT_VALUES}})
        value_rows += [{"study_id": study_id, "snapshot": snap, "trial_number": n, "name": k,
                        "value": v} for k, v in vals.items()]
    return rows, value_rows


def _snapshot_row(study_id: int, snap: int, *, trigger_trial: int | None, n_complete: int,
                  hypervolume: float | None, reference_point: dict[str, float] | None,
                  created_at: datetime) -> dict[str, Any]:
    return {"study_id": study_id, "snapshot": snap, "trigger_trial": trigger_trial,
            "n_complete": n_complete, "hypervolume": finite(hypervolume),
            "reference_point": reference_point, "created_at": created_at}


@retried
def write_snapshot(db: Database, study_id: int, *, trigger_trial: int | None, n_complete: int,
                   points: Sequence[Mapping[str, Any]], hypervolume: float | None,
                   reference_point: dict[str, float] | None) -> int:
    """Append a Pareto snapshot (its number is returned). ``points``: dicts with
    ``trial_number``, ``is_knee`` and ``values`` (objective name -> value)."""
    ps = s.pareto_snapshots
    with db.tx("write pareto snapshot") as conn:
        last = conn.execute(select(ps.c.snapshot).where(ps.c.study_id == study_id).order_by(
            ps.c.snapshot.desc()).limit(1)).scalar()
        snap = (last or 0) + 1
        conn.execute(s.pareto_snapshots.insert().values(**_snapshot_row(
            study_id, snap, trigger_trial=trigger_trial, n_complete=n_complete,
            hypervolume=hypervolume, reference_point=reference_point, created_at=utcnow())))
        rows, value_rows = _point_rows(study_id, snap, points)
        if rows:
            conn.execute(s.pareto_points.insert(), rows)
        if value_rows:
            conn.execute(s.pareto_values.insert(), value_rows)
    return snap


# ----------------------------------------------------------------------------- bulk


@retried
def import_trials(db: Database, study_id: int, trials: Sequence[Mapping[str, Any]],
                  snapshots: Sequence[Mapping[str, Any]] = ()) -> None:
    """Bulk-load finished trials and snapshots in one transaction (synthetic studies for
    tests and benchmarks, imports): what the driver's writes would have left, without one
    transaction per row.

    A trial: ``number``, ``state`` and optionally ``detail``, ``counted``, ``params``,
    ``config``, ``values``, ``epochs_completed``, ``max_epochs``, ``error``,
    ``weights_path``, ``started_at``, ``finished_at``, ``epochs`` (metric dicts with
    ``epoch``), ``layers``. A snapshot: the :func:`write_snapshot` arguments plus
    ``created_at``; snapshots are numbered on from the study's last."""
    now = utcnow()
    trial_rows, value_rows, epoch_rows, layer_rows = [], [], [], []
    for t in trials:
        n = int(t["number"])
        named = _named(t.get("values") or {})
        trial_rows.append({
            "study_id": study_id, "number": n, "optuna_trial_id": t.get("optuna_trial_id"),
            "state": t["state"], "detail": t.get("detail"), "counted": bool(t.get("counted", True)),
            "params": jsonable(t.get("params") or {}), "config": t.get("config"),
            "epochs_completed": int(t.get("epochs_completed") or 0),
            "max_epochs": t.get("max_epochs"), "error": t.get("error"),
            "weights_path": t.get("weights_path"), "started_at": t.get("started_at") or now,
            "finished_at": t.get("finished_at"), "retries": int(t.get("retries") or 0),
            **{k: named.get(k) for k in s.LEGACY_TRIAL_VALUES}})
        value_rows += [{"study_id": study_id, "trial_number": n, "name": k, "value": v}
                       for k, v in named.items()]
        epoch_rows += [_epoch_row(study_id, n, m, t.get("started_at") or now)
                       for m in t.get("epochs") or []]
        layer_rows += _layer_rows(study_id, n, t.get("layers") or [])
    ps = s.pareto_snapshots
    with db.tx("import trials") as conn:
        last = conn.execute(select(ps.c.snapshot).where(ps.c.study_id == study_id).order_by(
            ps.c.snapshot.desc()).limit(1)).scalar() or 0
        snap_rows, point_rows, point_value_rows = [], [], []
        for i, sn in enumerate(snapshots, start=last + 1):
            snap_rows.append(_snapshot_row(
                study_id, i, trigger_trial=sn.get("trigger_trial"),
                n_complete=int(sn["n_complete"]), hypervolume=sn.get("hypervolume"),
                reference_point=sn.get("reference_point"), created_at=sn.get("created_at") or now))
            r, v = _point_rows(study_id, i, sn.get("points") or [])
            point_rows += r
            point_value_rows += v
        for table, rows in ((s.trials, trial_rows), (s.trial_values, value_rows),
                            (s.pareto_snapshots, snap_rows),
                            (s.epoch_metrics, epoch_rows), (s.layers, layer_rows),
                            (s.pareto_points, point_rows), (s.pareto_values, point_value_rows)):
            if rows:
                conn.execute(table.insert(), rows)
