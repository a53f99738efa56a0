"""Read-only queries over the qsearch tables, for the CLI, export, the driver and dashboards.

Every function takes a :class:`~qsearch.store.engine.Database` (a :class:`~qsearch.store.Store`
is one) and returns frozen, typed records. None of them writes, so a dashboard may call them
while a driver is running, and each is retried as a whole on transient errors
(``db.retries`` times): the driver reads the front through them mid-study.

Objective values are read by name from ``qsearch_trial_values`` / ``qsearch_pareto_values``
(:attr:`TrialRow.values`, :attr:`FrontPoint.values`); :meth:`_Row.value` also finds a value
stored under an objective's old name (``backward_cost`` for ``backward_bops``). Records still
answer ``row["state"]``/``row.get("accuracy")`` like the dict rows of earlier versions, for
callers not yet moved to attributes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, inspect, or_, select

from qsearch.config import objectives as registry
from qsearch.errors import ConfigError, StorageError
from qsearch.store import schema as s
from qsearch.store.engine import Database, retried

TRIAL_STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL")
Values = Mapping[str, "float | None"]


def value_of(values: Values, name: str) -> float | None:
    """``values[name]``, else the value stored under another name of the same registered
    objective (an alias), else None."""
    if name in values:
        return values[name]
    want = registry.resolve_name(name)
    for k, v in values.items():
        if registry.resolve_name(k) == want:
            return v
    return None


class _Row:
    """Mapping-style access for records: fields by name, then (for records with values) an
    objective value by name, None when the record does not carry it."""

    def _missing(self, key: str) -> Any:
        raise KeyError(key)

    def __getitem__(self, key: str) -> Any:
        if key in self.__dataclass_fields__:  # type: ignore[attr-defined]
            return getattr(self, key)
        return self._missing(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        """A plain (shallow) dict of the fields, for JSON output."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


class _Valued(_Row):
    values: Values

    def value(self, name: str) -> float | None:
        return value_of(self.values, name)

    def _missing(self, key: str) -> Any:
        return self.value(key)


@dataclass(frozen=True)
class ObjectiveInfo:
    """What the registry says about a stored objective name (label, unit, direction, kind);
    a name this installation does not register keeps its bare name as label."""

    name: str
    label: str
    unit: str
    direction: str | None
    kind: str
    registered: bool
    optimizable: bool = True

    @property
    def axis_title(self) -> str:
        inner = ", ".join(p for p in (self.unit, self.kind) if p)
        return f"{self.label} ({inner})" if inner else self.label

    @property
    def short(self) -> str:
        """``label (unit)``: a table header."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def arrow(self) -> str:
        return {"maximize": "↑", "minimize": "↓"}.get(self.direction or "", "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def objective_info(name: str, direction: str | None = None) -> ObjectiveInfo:
    """Registry facts for ``name``; ``direction`` (the study's) fills in for an unknown name."""
    try:
        o = registry.get_objective(name)
    except KeyError:
        return ObjectiveInfo(name, name, "", direction, "", registered=False)
    return ObjectiveInfo(name, o.label, o.unit, o.direction, o.kind, registered=True,
                         optimizable=getattr(o, "optimizable", True))


def order_names(names: Iterable[str], first: Iterable[str] = ()) -> list[str]:
    """``first`` in its order, then the other names in registry order (unknown ones last,
    alphabetically): a stable column order for tables."""
    first = [n for n in first]
    rest = set(names) - set(first)
    known = {n: i for i, n in enumerate(registry.objective_names())}
    return first + sorted(rest, key=lambda n: (known.get(registry.resolve_name(n), len(known)), n))


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StudyRecord(_Row):
    id: int
    name: str
    status: str
    spec_yaml: str
    spec_hash: str
    search_hash: str
    objectives: list[str]
    directions: list[str]
    artifacts_dir: str | None
    created_at: datetime
    finished_at: datetime | None
    lease_host: str | None
    lease_pid: int | None
    lease_heartbeat_at: datetime | None

    def objective_infos(self) -> list[ObjectiveInfo]:
        return [objective_info(o, d) for o, d in zip(self.objectives, self.directions)]


@dataclass(frozen=True)
class StudyRow(_Row):
    """One line of :func:`list_studies`: the study, its lease and trial counts per state."""

    id: int
    name: str
    status: str
    objectives: list[str]
    directions: list[str]
    spec_hash: str
    created_at: datetime
    finished_at: datetime | None
    lease_host: str | None
    lease_pid: int | None
    lease_heartbeat_at: datetime | None
    trials: dict[str, int]
    n_trials: int


@dataclass(frozen=True)
class TrialRow(_Valued):
    study_id: int
    number: int
    optuna_trial_id: int | None
    state: str
    detail: str | None
    counted: bool
    params: dict[str, Any] | None
    config: dict[str, Any] | None
    values: dict[str, float | None]
    epochs_completed: int
    max_epochs: int | None
    error: str | None
    weights_path: str | None
    started_at: datetime
    finished_at: datetime | None
    retries: int
    placement: dict[str, Any] | None
    feasible: bool | None = None
    reused_from: int | None = None


@dataclass(frozen=True)
class EpochRow(_Row):
    """One epoch's report; every metric (method ones too) in ``metrics``."""

    trial_number: int
    epoch: int
    metrics: dict[str, Any]
    created_at: datetime

    def _missing(self, key: str) -> Any:
        return self.metrics.get(key)


@dataclass(frozen=True)
class LayerRow(_Row):
    idx: int
    name: str
    kind: str | None
    params: int
    macs: int
    w_bits: int
    a_bits: int
    g_bits: int
    frozen_fraction: float


@dataclass(frozen=True)
class SnapshotRow(_Row):
    snapshot: int
    trigger_trial: int | None
    n_complete: int
    hypervolume: float | None
    reference_point: dict[str, float] | None
    created_at: datetime


@dataclass(frozen=True)
class FrontPoint(_Valued):
    """A trial on a stored front: the objective values the front was computed on, the
    trial's searched ``params`` and its other stored values (``reported``, e.g.
    ``test_accuracy``)."""

    trial_number: int
    is_knee: bool
    values: dict[str, float | None]
    params: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialValues(_Valued):
    """A COMPLETE trial's values: the input of a Pareto snapshot."""

    number: int
    values: dict[str, float | None]
    weights_path: str | None = None


@dataclass(frozen=True)
class StudyOverview:
    """Per study, for the study list: best stored value per name over COMPLETE trials (by
    the registry's direction; both ends for an unknown name) and the latest hypervolume."""

    best_max: dict[str, float]
    best_min: dict[str, float]
    hypervolume: float | None = None
    n_front_complete: int | None = None

    def best(self, name: str, direction: str | None) -> float | None:
        d = objective_info(name, direction).direction
        src = self.best_max if d == "maximize" else self.best_min
        return value_of(src, name)


def _study(m: Mapping[str, Any]) -> StudyRecord:
    return StudyRecord(
        id=m["id"], name=m["name"], status=m["status"], spec_yaml=m["spec_yaml"],
        spec_hash=m["spec_hash"], search_hash=m["search_hash"], objectives=list(m["objectives"]),
        directions=list(m["directions"]), artifacts_dir=m["artifacts_dir"],
        created_at=m["created_at"], finished_at=m["finished_at"], lease_host=m["lease_host"],
        lease_pid=m["lease_pid"], lease_heartbeat_at=m["lease_heartbeat_at"])


_TRIAL_FIELDS = [f.name for f in dataclasses.fields(TrialRow) if f.name != "values"]
_V3_TRIAL_FIELDS = ("feasible", "reused_from")  # absent from a not yet upgraded v2 store


def _by_name(conn: Connection) -> bool:
    """Whether the values-by-name tables exist (schema v3). A reader may open a v2 store
    that no v3 writer has upgraded yet (read-only connections never upgrade); its values are
    then read from the old columns, under the columns' names."""
    return inspect(conn).has_table(s.trial_values.name)


def _legacy(row: Any, names: Iterable[str]) -> dict[str, float | None]:
    return {n: row._mapping[n] for n in names if row._mapping[n] is not None}


def _values_by_trial(conn: Connection, study_id: int, numbers: list[int] | None = None
                     ) -> dict[int, dict[str, float | None]]:
    out: dict[int, dict[str, float | None]] = {}
    if not _by_name(conn):
        t = s.trials
        q = select(t.c.number, *(t.c[n] for n in s.LEGACY_TRIAL_VALUES)).where(
            t.c.study_id == study_id)
        if numbers is not None:
            q = q.where(t.c.number.in_(numbers))
        for r in conn.execute(q):
            out[r.number] = _legacy(r, s.LEGACY_TRIAL_VALUES)
        return out
    v = s.trial_values
    q = select(v.c.trial_number, v.c.name, v.c.value).where(v.c.study_id == study_id)
    if numbers is not None:
        q = q.where(v.c.trial_number.in_(numbers))
    for n, name, value in conn.execute(q.order_by(v.c.trial_number, v.c.name)):
        out.setdefault(n, {})[name] = value
    return out


def _point_values(conn: Connection, study_id: int, snapshot: int
                  ) -> dict[int, dict[str, float | None]]:
    out: dict[int, dict[str, float | None]] = {}
    if not _by_name(conn):
        pp = s.pareto_points
        for r in conn.execute(select(pp.c.trial_number, *(pp.c[n] for n in s.LEGACY_POINT_VALUES))
                              .where(pp.c.study_id == study_id, pp.c.snapshot == snapshot)):
            out[r.trial_number] = _legacy(r, s.LEGACY_POINT_VALUES)
        return out
    pv = s.pareto_values
    for n, name, value in conn.execute(select(pv.c.trial_number, pv.c.name, pv.c.value).where(
            pv.c.study_id == study_id, pv.c.snapshot == snapshot)):
        out.setdefault(n, {})[name] = value
    return out


def _trial_rows(conn: Connection, study_id: int, states: list[str] | None = None,
                number: int | None = None) -> list[TrialRow]:
    t = s.trials
    fields = _TRIAL_FIELDS if _by_name(conn) else [f for f in _TRIAL_FIELDS
                                                    if f not in _V3_TRIAL_FIELDS]
    q = select(*(t.c[f] for f in fields)).where(t.c.study_id == study_id)
    if states:
        q = q.where(t.c.state.in_(states))
    if number is not None:
        q = q.where(t.c.number == number)
    rows = conn.execute(q.order_by(t.c.number)).all()
    values = _values_by_trial(conn, study_id, [number] if number is not None else None)
    return [TrialRow(values=values.get(r.number, {}),
                     **{**r._mapping, "retries": r.retries or 0}) for r in rows]


# ----------------------------------------------------------------------------- studies


@retried
def get_study(db: Database, name: str) -> StudyRecord | None:
    with db.tx("read study") as conn:
        row = conn.execute(select(s.studies).where(s.studies.c.name == name)).first()
    return _study(row._mapping) if row is not None else None


@retried  # the database is the first argument, as for the store's methods
def require_study(db: Database, name: str) -> StudyRecord:
    """The study named ``name`` or a ConfigError listing the known studies."""
    if not db.has_schema():
        raise StorageError(f"database {db.masked_url} has no qsearch studies "
                           "(no qsearch tables); launch a study first")
    rec = get_study(db, name)
    if rec is None:
        known = [st.name for st in list_studies(db)]
        raise ConfigError("study", f"no study named {name!r} in {db.masked_url}"
                          + (f"; known studies: {', '.join(known)}" if known else ""))
    return rec


@retried
def list_studies(db: Database) -> list[StudyRow]:
    """Every study with its status, lease holder and trial counts per state."""
    st = s.studies
    with db.tx("list studies") as conn:
        studies = conn.execute(select(
            st.c.id, st.c.name, st.c.status, st.c.objectives, st.c.directions, st.c.spec_hash,
            st.c.created_at, st.c.finished_at, st.c.lease_host, st.c.lease_pid,
            st.c.lease_heartbeat_at).order_by(st.c.id)).all()
        counts = conn.execute(select(s.trials.c.study_id, s.trials.c.state, func.count()).group_by(
            s.trials.c.study_id, s.trials.c.state)).all()
    by_study: dict[int, dict[str, int]] = {}
    for sid, state, n in counts:
        by_study.setdefault(sid, {})[state] = int(n)
    out = []
    for r in studies:
        c = by_study.get(r.id, {})
        m = dict(r._mapping)
        m["objectives"], m["directions"] = list(m["objectives"]), list(m["directions"])
        out.append(StudyRow(**m, trials={state: c.get(state, 0) for state in TRIAL_STATES},
                            n_trials=sum(c.values())))
    return out


@retried
def study_status(db: Database, name: str) -> str | None:
    """Just the status column (the cheap check behind a live-refresh switch)."""
    with db.tx("read study status") as conn:
        return conn.execute(select(s.studies.c.status).where(s.studies.c.name == name)).scalar()


@retried
def study_overview(db: Database) -> dict[int, StudyOverview]:
    """Per study id: best value of each stored name over COMPLETE trials and the latest
    snapshot's hypervolume (grouped queries in one transaction)."""
    t, v, snap = s.trials, s.trial_values, s.pareto_snapshots
    best_q = select(v.c.study_id, v.c.name, func.max(v.c.value), func.min(v.c.value)).join(
        t, (t.c.study_id == v.c.study_id) & (t.c.number == v.c.trial_number)).where(
        t.c.state == "COMPLETE").group_by(v.c.study_id, v.c.name)
    last = select(snap.c.study_id, func.max(snap.c.snapshot).label("last")).group_by(
        snap.c.study_id).subquery()
    hv_q = select(snap.c.study_id, snap.c.hypervolume, snap.c.n_complete).join(
        last, (snap.c.study_id == last.c.study_id) & (snap.c.snapshot == last.c.last))
    hi: dict[int, dict[str, float]] = {}
    lo: dict[int, dict[str, float]] = {}
    hvs: dict[int, tuple[float | None, int]] = {}
    with db.tx("study overview") as conn:
        if not _by_name(conn):  # a v2 store: the old columns
            cols = [t.c[n] for n in s.LEGACY_TRIAL_VALUES]
            best_q = select(t.c.study_id, *(func.max(c) for c in cols),
                            *(func.min(c) for c in cols)).where(
                t.c.state == "COMPLETE").group_by(t.c.study_id)
            k = len(cols)
            for r in conn.execute(best_q):
                for j, name in enumerate(s.LEGACY_TRIAL_VALUES):
                    if r[1 + j] is not None:
                        hi.setdefault(r[0], {})[name] = r[1 + j]
                        lo.setdefault(r[0], {})[name] = r[1 + k + j]
        else:
            for sid, name, mx, mn in conn.execute(best_q):
                if mx is not None:
                    hi.setdefault(sid, {})[name] = mx
                    lo.setdefault(sid, {})[name] = mn
        for sid, hv, n in conn.execute(hv_q):
            hvs[sid] = (hv, n)
    return {sid: StudyOverview(hi.get(sid, {}), lo.get(sid, {}), *hvs.get(sid, (None, None)))
            for sid in set(hi) | set(hvs)}


# ----------------------------------------------------------------------------- trials


@retried
def trials(db: Database, study: str, states: list[str] | None = None) -> list[TrialRow]:
    """Trials of a study with their state, params, config and values by name."""
    rec = require_study(db, study)
    with db.tx("list trials") as conn:
        return _trial_rows(conn, rec.id, states)


@retried
def study_trials(db: Database, study_id: int) -> list[TrialRow]:
    """Every trial of the study with id ``study_id`` (the dashboard has the id already)."""
    with db.tx("list study trials") as conn:
        return _trial_rows(conn, study_id)


@retried
def trial(db: Database, study: str, number: int) -> TrialRow:
    rec = require_study(db, study)
    with db.tx("read trial") as conn:
        rows = _trial_rows(conn, rec.id, number=number)
    if not rows:
        raise ConfigError("trial", f"study {study!r} has no trial {number}")
    return rows[0]


@retried
def epoch_metrics(db: Database, study: str, trial_number: int | None = None) -> list[EpochRow]:
    """Per-epoch reports (learning curves), ordered by trial then epoch."""
    rec = require_study(db, study)
    e = s.epoch_metrics
    q = select(e.c.trial_number, e.c.epoch, e.c.metrics, e.c.created_at).where(
        e.c.study_id == rec.id)
    if trial_number is not None:
        q = q.where(e.c.trial_number == trial_number)
    with db.tx("read epoch metrics") as conn:
        rows = conn.execute(q.order_by(e.c.trial_number, e.c.epoch)).all()
    return [EpochRow(r.trial_number, r.epoch, dict(r.metrics or {}), r.created_at) for r in rows]


@retried
def layer_records(db: Database, study: str, trial_number: int) -> list[LayerRow]:
    """Per-layer precision/cost records of a finished trial, in layer order."""
    rec = require_study(db, study)
    lay = s.layers
    cols = [f.name for f in dataclasses.fields(LayerRow)]
    with db.tx("read layer records") as conn:
        rows = conn.execute(select(*(lay.c[c] for c in cols)).where(
            lay.c.study_id == rec.id, lay.c.trial_number == trial_number).order_by(
            lay.c.idx)).all()
    return [LayerRow(**r._mapping) for r in rows]


@retried
def complete_values(db: Database, study_id: int) -> list[TrialValues]:
    """Values of every COMPLETE trial (the input of a Pareto snapshot)."""
    t = s.trials
    with db.tx("read complete trials") as conn:
        q = select(t.c.number, t.c.weights_path, t.c.config).where(
            t.c.study_id == study_id, t.c.state == "COMPLETE")
        if _by_name(conn):  # infeasible and reused trials are never front candidates
            q = q.where(or_(t.c.feasible.is_(None), t.c.feasible.is_(True)),
                        t.c.reused_from.is_(None))
        rows = conn.execute(q.order_by(t.c.number)).all()
        values = _values_by_trial(conn, study_id)
    seen: set[str] = set()
    out = []
    for r in rows:  # one candidate per config: the earliest trial that ran it
        key = json.dumps(r.config, sort_keys=True) if r.config else f"#{r.number}"
        if key not in seen:
            seen.add(key)
            out.append(TrialValues(r.number, values.get(r.number, {}), r.weights_path))
    return out


# ----------------------------------------------------------------------------- pareto


def _snapshot(m: Mapping[str, Any]) -> SnapshotRow:
    return SnapshotRow(m["snapshot"], m["trigger_trial"], m["n_complete"], m["hypervolume"],
                       m["reference_point"], m["created_at"])


@retried
def pareto_snapshots(db: Database, study: str) -> list[SnapshotRow]:
    """The hypervolume history: one row per snapshot, oldest first."""
    rec = require_study(db, study)
    with db.tx("read pareto snapshots") as conn:
        rows = conn.execute(select(s.pareto_snapshots).where(
            s.pareto_snapshots.c.study_id == rec.id).order_by(s.pareto_snapshots.c.snapshot)).all()
    return [_snapshot(r._mapping) for r in rows]


@retried
def pareto_front(db: Database, study: str, snapshot: int | None = None
                 ) -> tuple[SnapshotRow | None, list[FrontPoint]]:
    """(snapshot, its points) for ``snapshot`` or the latest; (None, []) before any."""
    rec = require_study(db, study)
    ps, pp = s.pareto_snapshots, s.pareto_points
    with db.tx("read pareto front") as conn:
        q = select(ps).where(ps.c.study_id == rec.id)
        q = q.where(ps.c.snapshot == snapshot) if snapshot is not None else \
            q.order_by(ps.c.snapshot.desc()).limit(1)
        snap = conn.execute(q).first()
        if snap is None:
            return None, []
        points = conn.execute(select(pp.c.trial_number, pp.c.is_knee).where(
            pp.c.study_id == rec.id, pp.c.snapshot == snap.snapshot).order_by(
            pp.c.trial_number)).all()
        values = _point_values(conn, rec.id, snap.snapshot)
        numbers = [p.trial_number for p in points]
        params = dict(conn.execute(select(s.trials.c.number, s.trials.c.params).where(
            s.trials.c.study_id == rec.id, s.trials.c.number.in_(numbers))).all())
        stored = _values_by_trial(conn, rec.id, numbers)
    out = []
    for p in points:
        vals = values.get(p.trial_number, {})
        reported = {k: v for k, v in stored.get(p.trial_number, {}).items()
                    if value_of(vals, k) is None and k not in vals}
        out.append(FrontPoint(int(p.trial_number), bool(p.is_knee), vals,
                              dict(params.get(p.trial_number) or {}), reported))
    return _snapshot(snap._mapping), out


# ----------------------------------------------------------------------------- last epochs


@dataclass(frozen=True)
class LastEpoch(_Row):
    """A trial's last stored epoch report. For a PRUNED or FAIL trial it is the last rung it
    reached (the only values it has: such trials store no final values); for a COMPLETE one
    it is the final report, which for a study with ``repeats: N`` carries each objective's
    spread over the seeds (``<metric>.std``) and ``repeats``."""

    trial_number: int
    epoch: int
    metrics: dict[str, Any]

    def _missing(self, key: str) -> Any:
        return self.metrics.get(key)


@retried
def last_epochs(db: Database, study_id: int) -> dict[int, LastEpoch]:
    """Trial number -> its last stored epoch report, for every trial of the study that
    reported one (one grouped query: the dashboards place pruned and failed trials at their
    last rung and draw the repeats' error bars from it)."""
    e = s.epoch_metrics
    last = select(e.c.trial_number, func.max(e.c.epoch).label("epoch")).where(
        e.c.study_id == study_id).group_by(e.c.trial_number).subquery()
    q = select(e.c.trial_number, e.c.epoch, e.c.metrics).join(
        last, (e.c.trial_number == last.c.trial_number) & (e.c.epoch == last.c.epoch)).where(
        e.c.study_id == study_id)
    with db.tx("read last epochs") as conn:
        rows = conn.execute(q).all()
    return {int(r.trial_number): LastEpoch(int(r.trial_number), int(r.epoch),
                                           dict(r.metrics or {})) for r in rows}
