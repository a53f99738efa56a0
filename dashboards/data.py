"""What each page shows, read from the store into plain dataclasses.

Pages and the report build figures from these objects only, so the figure builders never
touch SQL and can be tested on plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboards import queries as dq
from dashboards.readonly import Source
from qsearch.store import StudyRecord, queries

OBJECTIVE_LABELS = {"accuracy": "accuracy", "size_mb": "size (MB)",
                    "backward_cost": "backward cost (x FP32)", "bops": "forward BOPs"}
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


@dataclass
class StudySummary:
    name: str
    status: str
    objectives: list[str]
    directions: list[str]
    counts: dict[str, int]
    best: dict[str, float | None]
    hypervolume: float | None
    created_at: Any
    lease_host: str | None


@dataclass
class StudyView:
    record: StudyRecord
    trials: list[dict[str, Any]]
    snapshot: dict[str, Any] | None
    front: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def running(self) -> bool:
        return self.record.status == "running"

    @property
    def front_numbers(self) -> list[int]:
        return [int(p["trial_number"]) for p in self.front]

    def complete(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["state"] == "COMPLETE"
                and all(t.get(o) is not None for o in ("accuracy", "size_mb", "backward_cost"))]


@dataclass
class TrialView:
    record: StudyRecord
    trial: dict[str, Any]
    layers: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    on_front: bool
    is_knee: bool

    @property
    def running(self) -> bool:
        return self.trial["state"] == "RUNNING"


def list_studies(src: Source) -> list[StudySummary]:
    """Every qsearch study in the database, with counts, best values and hypervolume."""
    if not src.store.has_schema():
        return []
    rows = queries.list_studies(src.store)
    extra = dq.study_overview(src.store)
    out = []
    for r in rows:
        ex = extra.get(r["id"], {})
        out.append(StudySummary(
            name=r["name"], status=r["status"], objectives=list(r["objectives"]),
            directions=list(r["directions"]), counts=dict(r["trials"]),
            best=ex.get("best", {}), hypervolume=ex.get("hypervolume"),
            created_at=r["created_at"], lease_host=r["lease_host"]))
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


def study_view(src: Source, name: str) -> StudyView:
    rec = queries.require_study(src.store, name)
    rows = dq.study_trials(src.store, rec.id)
    snap, front = queries.pareto_front(src.store, name)
    snapshots = queries.pareto_snapshots(src.store, name)
    on_front = {int(p["trial_number"]): bool(p["is_knee"]) for p in front}
    counts = {st: 0 for st in queries.TRIAL_STATES}
    trials = []
    for r in rows:
        config = r.pop("config", None)
        r["baseline"] = baseline_label(config)
        r["on_front"] = r["number"] in on_front
        r["is_knee"] = on_front.get(r["number"], False)
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        trials.append(r)
    return StudyView(record=rec, trials=trials, snapshot=snap, front=front,
                     snapshots=snapshots, counts=counts)


def trial_view(src: Source, name: str, number: int) -> TrialView:
    rec = queries.require_study(src.store, name)
    row = queries.trial(src.store, name, number)
    layers = queries.layer_records(src.store, name, number)
    epochs = queries.epoch_metrics(src.store, name, number)
    _, front = queries.pareto_front(src.store, name)
    knee = {int(p["trial_number"]): bool(p["is_knee"]) for p in front}
    return TrialView(record=rec, trial=row, layers=layers, epochs=epochs,
                     on_front=number in knee, is_knee=knee.get(number, False))
