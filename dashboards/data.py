"""What each page shows, read through :mod:`qsearch.store.queries` into plain data.

Pages and the report build figures from these objects only, so the figure builders never
touch SQL and can be tested on plain data. The dashboard reads only: every function here
calls a query, none a write. Objective names, labels, units and directions come from the
objective registry (:func:`qsearch.store.objective_info`); a name the registry does not know
is shown by its bare name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dashboards import axes
from dashboards.categories import ending
from dashboards.readonly import Source
from qsearch.config.objectives import get_objective, resolve_name
from qsearch.config.objectives import objectives as registered
from qsearch.store import ObjectiveInfo, StudyRecord, objective_info, queries
from qsearch.store.queries import LayerRow, SnapshotRow, TrialRow, value_of

METHOD_NAMES = ("lts", "tr", "gradq", "csq", "blockrep")


def baseline_label(config: dict[str, Any] | None) -> str | None:
    """``"W4A4"`` when the trial is a uniform-precision baseline, else None.

    A baseline trains plain LSQ at one (weight, activation) bit-width pair: no per-layer
    rules and no QAT method enabled (so no CSQ-learned mixed precision, no LTS/TR/gradq/
    blockrep). It is the point each method has to beat at the same size, which is why the
    Pareto plots mark it. First/last-layer overrides (8-bit by convention) do not count as
    mixed precision.
    """
    if not isinstance(config, dict):
        return None
    if config.get("layers"):
        return None
    methods = config.get("methods") or {}
    if any(isinstance(methods.get(m), dict) and methods[m].get("enabled") for m in METHOD_NAMES):
        return None
    w, a = config.get("w_bits"), config.get("a_bits")
    return f"W{w}A{a}" if w is not None and a is not None else None


def infos(record: StudyRecord) -> list[ObjectiveInfo]:
    return [objective_info(o, d) for o, d in zip(record.objectives, record.directions)]


def reported_names(rows: list[dict[str, Any]], objectives: list[str]) -> list[str]:
    """Values the trials carry beyond the objectives (test accuracy, forward BOPs ...), in
    registry order."""
    names = {k for r in rows for k in (r.get("values") or {})}
    return [n for n in queries.order_names(names) if not _among(n, objectives)]


def _among(name: str, names: list[str]) -> bool:
    """``name`` is one of ``names``, also under another name of the same objective."""
    want = resolve_name(name)
    return any(resolve_name(n) == want for n in names)


@dataclass
class StudySummary:
    name: str
    status: str
    objectives: list[ObjectiveInfo]
    counts: dict[str, int]
    best: dict[str, float | None]
    hypervolume: float | None
    created_at: Any
    lease_host: str | None


@dataclass
class StudyView:
    record: StudyRecord
    objectives: list[ObjectiveInfo]
    trials: list[dict[str, Any]]
    snapshot: SnapshotRow | None
    front: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    #: "stored": the front of the latest snapshot (the study's objectives); "recomputed":
    #: the front of the stored values on other axes (a training-cost objective swapped).
    front_source: str = "stored"

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def running(self) -> bool:
        return self.record.status == "running"

    @property
    def front_numbers(self) -> list[int]:
        return [int(p["trial_number"]) for p in self.front]

    @property
    def reported(self) -> list[str]:
        return reported_names(self.trials, self.record.objectives)

    def complete(self) -> list[dict[str, Any]]:
        """COMPLETE trials that count as results: feasible, not a reused duplicate."""
        return [t for t in self.trials if t["state"] == "COMPLETE"
                and t.get("feasible") is not False and t.get("reused_from") is None
                and all(value_of(t["values"], o.name) is not None for o in self.objectives)]

    @property
    def optimized(self) -> list[ObjectiveInfo]:
        """The study's own objectives (the axes may have another training cost)."""
        return infos(self.record)


@dataclass
class TrialView:
    record: StudyRecord
    trial: TrialRow
    layers: list[LayerRow]
    epochs: list[dict[str, Any]]
    on_front: bool
    is_knee: bool

    @property
    def running(self) -> bool:
        return self.trial.state == "RUNNING"

    def values(self) -> list[tuple[ObjectiveInfo, float | None]]:
        """(registry facts, value) of the study's objectives, then the other stored values."""
        objs = infos(self.record)
        names = [o.name for o in objs]
        rest = [n for n in queries.order_names(self.trial.values) if not _among(n, names)]
        return [(o, self.trial.value(o.name)) for o in objs] + \
            [(objective_info(n), self.trial.values[n]) for n in rest]

    @property
    def last_epoch(self) -> int | None:
        return max((int(e["epoch"]) for e in self.epochs), default=None)

    def rung(self) -> list[tuple[ObjectiveInfo, float | None]]:
        """The study's objectives at the last reported epoch: all a PRUNED or FAIL trial
        has (it stores no final values)."""
        last = next((e for e in self.epochs if int(e["epoch"]) == self.last_epoch), None)
        vals = rung_values(last["metrics"]) if last else {}
        return [(o, value_of(vals, o.name)) for o in infos(self.record)]

    def ending(self) -> str:
        """How the trial ended, in words (:func:`dashboards.categories.ending`)."""
        t = self.trial
        return ending({"state": t.state, "max_epochs": t.max_epochs,
                       "last_epoch": self.last_epoch or t.epochs_completed,
                       "reused_from": t.reused_from, "feasible": t.feasible})

    def why_no_layers(self) -> str | None:
        """Why a trial has no per-layer record (None when it has one or is running)."""
        t = self.trial
        if self.layers or t.state == "RUNNING":
            return None
        if t.reused_from is not None:
            return f"no per-layer record: this trial reused trial #{t.reused_from}'s result"
        if t.state in ("PRUNED", "FAIL"):
            return (f"no per-layer record: {self.ending().split(' (')[0].lower()} "
                    "(layers are recorded when a trial finishes)")
        return "no per-layer record stored for this trial"


def list_studies(src: Source) -> list[StudySummary]:
    """Every qsearch study in the database, with counts, best values and hypervolume."""
    if not src.store.has_schema():
        return []
    rows = queries.list_studies(src.store)
    extra = queries.study_overview(src.store)
    out = []
    for r in rows:
        ex = extra.get(r.id)
        objs = [objective_info(o, d) for o, d in zip(r.objectives, r.directions)]
        out.append(StudySummary(
            name=r.name, status=r.status, objectives=objs, counts=dict(r.trials),
            best={o.name: ex.best(o.name, o.direction) if ex else None for o in objs},
            hypervolume=ex.hypervolume if ex else None, created_at=r.created_at,
            lease_host=r.lease_host))
    return out


def optuna_only_studies(src: Source, known: set[str]) -> list[dict[str, Any]]:
    """Studies in Optuna's tables that qsearch did not launch (names and trial counts), so the
    list page can say they exist and point at optuna-dashboard for them."""
    import optuna

    try:
        summaries = optuna.get_all_study_summaries(src.optuna_storage(), include_best_trial=False)
    except Exception:  # noqa: BLE001 - no Optuna tables yet: nothing to list
        return []
    return [{"name": s.study_name, "n_trials": s.n_trials} for s in summaries
            if s.study_name not in known]


def _metric_key(name: str) -> str:
    try:
        return get_objective(name).metric_key
    except KeyError:
        return name


def rung_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Registered objectives' values in an epoch report, by objective name (where a PRUNED
    or FAIL trial stood at its last rung)."""
    out = {}
    for o in registered():
        x = metrics.get(o.metric_key)
        if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
            out[o.name] = float(x)
    return out


def spread_of(metrics: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Each objective's standard deviation over a repeated config's seeds (``<metric>.std``
    in its final report, :func:`qsearch.search.trainable.repeat_summary`)."""
    out = {}
    for n in names:
        x = metrics.get(f"{_metric_key(n)}.std")
        if isinstance(x, (int, float)) and math.isfinite(x):
            out[n] = float(x)
    return out


def _front(src: Source, rec: StudyRecord, axes_: list[str], stored: list[Any]
           ) -> tuple[list[dict[str, Any]], str]:
    """(front points, where they come from): the stored snapshot on the study's own
    objectives, else the front of the stored values on ``axes_`` (the same candidates the
    driver uses: COMPLETE, feasible, one trial per config), computed here and not stored."""
    if axes_ == list(rec.objectives):
        return ([{"trial_number": p.trial_number, "is_knee": p.is_knee,
                  "values": dict(p.values)} for p in stored], "stored")
    from qsearch.search.front import compute_front

    dirs = [objective_info(o).direction or "minimize" for o in axes_]
    rows = queries.complete_values(src.store, rec.id)
    return compute_front(rows, axes_, dirs)["points"], "recomputed"


def study_view(src: Source, name: str, cost: str | None = None) -> StudyView:
    """Everything the study page shows. ``cost``: draw the front on this training-cost
    objective instead of the study's (:data:`dashboards.axes.COSTS`), from stored values."""
    rec = queries.require_study(src.store, name)
    rows = queries.study_trials(src.store, rec.id)
    snap, front = queries.pareto_front(src.store, name)
    snapshots = queries.pareto_snapshots(src.store, name)
    last = queries.last_epochs(src.store, rec.id)
    axes_ = axes.with_cost(list(rec.objectives), cost)
    points, source = _front(src, rec, axes_, front)
    on_front = {int(p["trial_number"]): bool(p["is_knee"]) for p in points}
    counts = {st: 0 for st in queries.TRIAL_STATES}
    names = queries.order_names({n for r in rows for n in r.values} | set(axes_))
    trials = []
    for r in rows:
        ep = last.get(r.number)
        metrics = ep.metrics if ep else {}
        done = r.state == "COMPLETE"
        # The config decides whether a trial is a baseline; it is not sent to the browser.
        trials.append({"number": r.number, "state": r.state, "detail": r.detail,
                       "params": r.params or {}, "values": dict(r.values),
                       "epochs_completed": r.epochs_completed, "max_epochs": r.max_epochs,
                       "started_at": r.started_at, "finished_at": r.finished_at,
                       "baseline": baseline_label(r.config), "on_front": r.number in on_front,
                       "is_knee": on_front.get(r.number, False), "feasible": r.feasible,
                       "reused_from": r.reused_from, "error": r.error,
                       "last_epoch": ep.epoch if ep else None,
                       "rung": {} if done else rung_values(metrics),
                       "spread": spread_of(metrics, names) if done else {},
                       "repeats": metrics.get("repeats") if done else None})
        counts[r.state] = counts.get(r.state, 0) + 1
    directions = dict(zip(rec.objectives, rec.directions))
    return StudyView(record=rec, objectives=[objective_info(o, directions.get(o)) for o in axes_],
                     trials=trials, snapshot=snap,
        front=points, snapshots=[sn.to_dict() for sn in snapshots], counts=counts,
        front_source=source)


def trial_view(src: Source, name: str, number: int) -> TrialView:
    rec = queries.require_study(src.store, name)
    row = queries.trial(src.store, name, number)
    layers = queries.layer_records(src.store, name, number)
    epochs = queries.epoch_metrics(src.store, name, number)
    _, front = queries.pareto_front(src.store, name)
    knee = {p.trial_number: p.is_knee for p in front}
    return TrialView(record=rec, trial=row, layers=layers,
                     epochs=[{"epoch": e.epoch, "metrics": e.metrics} for e in epochs],
                     on_front=number in knee, is_knee=knee.get(number, False))


def trial_record(src: Source, name: str, number: int) -> dict[str, Any]:
    """A trial as one JSON-able document (the dashboard's download): study, params, config,
    values by name with the registry's label/unit/direction, per-layer precision. Read-only;
    the weights and the deployable export come from ``qsearch export``."""
    view = trial_view(src, name, number)
    t = view.trial
    return {
        "format": "qsearch-trial-record", "version": 1,
        "study": name, "trial": t.number, "state": t.state, "detail": t.detail,
        "spec_hash": view.record.spec_hash, "storage": src.masked_url,
        "on_front": view.on_front, "is_knee": view.is_knee,
        "values": {o.name: {"value": v, "label": o.label, "unit": o.unit,
                            "direction": o.direction, "kind": o.kind}
                   for o, v in view.values()},
        "params": t.params, "config": t.config,
        "precision": {r.name: {k: getattr(r, k) for k in ("kind", "w_bits", "a_bits", "g_bits",
                                                         "params", "macs", "frozen_fraction")}
                      for r in view.layers},
        "export": f"qsearch export {name} --trial {t.number} -o trial-{t.number}.json "
                  "(writes the weights and the deployable export)",
    }
