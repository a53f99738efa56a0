"""A store exactly as qsearch schema v2 wrote it (commit cfa4bba), for the upgrade tests.

The tables are an inline copy of that commit's ``qsearch/store/schema.py`` (values as the
columns ``accuracy``, ``size_mb``, ``backward_cost``, ``bops``; no value tables), and
:func:`build_v2_store` fills them the way that commit's ``Store`` did (same rows, same
columns), so the test needs neither the old code nor a binary fixture. ``test_store``
checks the copy against the DDL the old code produced (``V2_SQLITE_DDL``, captured from a
store made by cfa4bba's ``Store``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
)

metadata = MetaData()

schema_version = Table(
    "qsearch_schema_version", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("applied_at", DateTime, nullable=False),
)

studies = Table(
    "qsearch_studies", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("spec_yaml", Text, nullable=False),
    Column("spec_hash", String(64), nullable=False),
    Column("search_hash", String(64), nullable=False),
    Column("objectives", JSON, nullable=False),
    Column("directions", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("artifacts_dir", Text),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("lease_host", String(255)),
    Column("lease_pid", Integer),
    Column("lease_token", String(64)),
    Column("lease_heartbeat_at", DateTime),
    UniqueConstraint("name", name="qsearch_studies_name_key"),
)


def _fk() -> ForeignKey:
    return ForeignKey("qsearch_studies.id", ondelete="CASCADE")


trials = Table(
    "qsearch_trials", metadata,
    Column("study_id", Integer, _fk(), primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("optuna_trial_id", Integer),
    Column("state", String(16), nullable=False),
    Column("detail", Text),
    Column("counted", Boolean, nullable=False, default=False),
    Column("params", JSON),
    Column("config", JSON),
    Column("accuracy", Float),
    Column("size_mb", Float),
    Column("backward_cost", Float),
    Column("bops", Float),
    Column("epochs_completed", Integer, nullable=False, default=0),
    Column("max_epochs", Integer),
    Column("error", Text),
    Column("weights_path", Text),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("retries", Integer, nullable=False, default=0, server_default="0"),
    Column("placement", JSON),
)

epoch_metrics = Table(
    "qsearch_epoch_metrics", metadata,
    Column("study_id", Integer, _fk(), primary_key=True),
    Column("trial_number", Integer, primary_key=True, autoincrement=False),
    Column("epoch", Integer, primary_key=True, autoincrement=False),
    Column("accuracy", Float),
    Column("size_mb", Float),
    Column("backward_cost", Float),
    Column("bops", Float),
    Column("train_loss", Float),
    Column("test_loss", Float),
    Column("wall_s", Float),
    Column("metrics", JSON),
    Column("created_at", DateTime, nullable=False),
)

layers = Table(
    "qsearch_layers", metadata,
    Column("study_id", Integer, _fk(), primary_key=True),
    Column("trial_number", Integer, primary_key=True, autoincrement=False),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("kind", String(16)),
    Column("params", Integer),
    Column("macs", Integer),
    Column("w_bits", Integer),
    Column("a_bits", Integer),
    Column("g_bits", Integer),
    Column("frozen_fraction", Float),
)

pareto_snapshots = Table(
    "qsearch_pareto_snapshots", metadata,
    Column("study_id", Integer, _fk(), primary_key=True),
    Column("snapshot", Integer, primary_key=True, autoincrement=False),
    Column("trigger_trial", Integer),
    Column("n_complete", Integer, nullable=False),
    Column("hypervolume", Float),
    Column("reference_point", JSON),
    Column("created_at", DateTime, nullable=False),
)

pareto_points = Table(
    "qsearch_pareto_points", metadata,
    Column("study_id", Integer, _fk(), primary_key=True),
    Column("snapshot", Integer, primary_key=True, autoincrement=False),
    Column("trial_number", Integer, primary_key=True, autoincrement=False),
    Column("accuracy", Float),
    Column("size_mb", Float),
    Column("backward_cost", Float),
    Column("is_knee", Boolean, nullable=False, default=False),
)

STUDY = "old"
OBJECTIVES = ["accuracy", "size_mb", "backward_cost"]
DIRECTIONS = ["maximize", "minimize", "minimize"]
#: (number, state, accuracy, size_mb, backward_cost, bops) of the v2 study's trials.
TRIALS = [(0, "COMPLETE", 0.91, 0.20, 0.60, 1.0e6),
          (1, "COMPLETE", 0.85, 0.05, 0.40, 4.0e5),
          (2, "COMPLETE", 0.80, 0.30, 0.70, 2.0e6),  # dominated by trial 0
          (3, "PRUNED", None, None, None, None)]
FRONT = [0, 1]
LAYERS = [{"name": "conv1", "kind": "conv", "params": 10, "macs": 100, "w_bits": 8,
           "a_bits": 8, "g_bits": 32, "frozen_fraction": 0.0},
          {"name": "fc", "kind": "linear", "params": 5, "macs": 5, "w_bits": 2,
           "a_bits": 2, "g_bits": 32, "frozen_fraction": 0.5}]


def build_v2_store(url: str, weights_dir: Path) -> None:
    """A finished v2 study ``old``: 3 COMPLETE trials and a PRUNED one, epochs, layers, two
    Pareto snapshots, weights files for the front trials (rows as cfa4bba's Store wrote)."""
    eng = create_engine(url)
    t0 = datetime(2024, 5, 1, 12, 0, 0)
    try:
        with eng.begin() as c:
            metadata.create_all(c)
            c.execute(schema_version.insert().values(id=1, version=2, applied_at=t0))
            sid = c.execute(studies.insert().values(
                name=STUDY, spec_yaml=f"name: {STUDY}\n", spec_hash="a" * 64,
                search_hash="b" * 64, objectives=OBJECTIVES, directions=DIRECTIONS,
                status="finished", artifacts_dir=str(weights_dir), created_at=t0,
                updated_at=t0, finished_at=t0 + timedelta(hours=1))).inserted_primary_key[0]
            for n, state, acc, size, bwd, bops in TRIALS:
                done = state == "COMPLETE"
                weights = None
                if n in FRONT:
                    weights = weights_dir / f"trial_{n}" / "weights.pt"
                    weights.parent.mkdir(parents=True, exist_ok=True)
                    weights.write_bytes(b"weights of trial %d" % n)
                c.execute(trials.insert().values(
                    study_id=sid, number=n, optuna_trial_id=n + 1, state=state,
                    detail="finished" if done else "pruned by asha", counted=True,
                    params={"w_bits": 2 + n, "lr": 0.01}, config={"w_bits": 2 + n},
                    accuracy=acc, size_mb=size, backward_cost=bwd, bops=bops,
                    epochs_completed=2 if done else 1, max_epochs=2,
                    weights_path=str(weights) if weights else None,
                    started_at=t0 + timedelta(minutes=n), finished_at=t0 + timedelta(minutes=n + 1),
                    retries=0, placement={"node_id": "n1", "gpu_ids": [], "device": "cpu"}))
                for e in range(1, (2 if done else 1) + 1):
                    m: dict[str, Any] = {"epoch": e, "accuracy": (acc or 0.5) - 0.1 / e,
                                         "train_loss": 0.5 / e, "size_mb": size}
                    c.execute(epoch_metrics.insert().values(
                        study_id=sid, trial_number=n, epoch=e, accuracy=m["accuracy"],
                        size_mb=size, train_loss=m["train_loss"], metrics=m, created_at=t0))
                if done:
                    c.execute(layers.insert(), [{"study_id": sid, "trial_number": n, "idx": i, **r}
                                                for i, r in enumerate(LAYERS)])
            # Snapshot 1 after trial 0, snapshot 2 after trial 2 (front {0, 1}).
            for snap, trig, front, n_complete, hv in ((1, 0, [0], 1, 0.1), (2, 2, FRONT, 3, 0.3)):
                c.execute(pareto_snapshots.insert().values(
                    study_id=sid, snapshot=snap, trigger_trial=trig, n_complete=n_complete,
                    hypervolume=hv, reference_point={"accuracy": 0.0, "size_mb": 0.33,
                                                     "backward_cost": 1.1},
                    created_at=t0 + timedelta(minutes=snap)))
                by_n = {t[0]: t for t in TRIALS}
                c.execute(pareto_points.insert(), [
                    {"study_id": sid, "snapshot": snap, "trial_number": n,
                     "accuracy": by_n[n][2], "size_mb": by_n[n][3], "backward_cost": by_n[n][4],
                     "is_knee": n == front[-1]} for n in front])
    finally:
        eng.dispose()
