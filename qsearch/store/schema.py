"""qsearch's own tables, beside Optuna's in the same database.

Every table is prefixed ``qsearch_`` and versioned by ``qsearch_schema_version`` (one row);
Optuna's tables and its ``alembic_version`` are never touched. All timestamps are naive UTC.

Tables (keys in brackets):

``qsearch_studies`` [id]
    one row per study: ``name`` (unique, equals the Optuna study name), the spec as YAML,
    ``spec_hash``/``search_hash``, ``objectives`` (JSON list, Optuna's value order),
    ``directions``, ``status`` (created | running | finished | stopped), created/updated/
    finished times, ``artifacts_dir``, and the driver lease: ``lease_host``, ``lease_pid``,
    ``lease_token``, ``lease_heartbeat_at``.
``qsearch_trials`` [study_id, number]
    one row per Optuna trial this study's drivers started (``number`` = Optuna's trial number):
    ``state`` (RUNNING | COMPLETE | PRUNED | FAIL, as in Optuna), ``detail`` (why it ended:
    ``finished``, ``pruned by asha``, ``driver lost`` ...), ``counted`` (whether it uses up
    budget), sampled ``params`` and full ``config`` (JSON), ``epochs_completed``/``max_epochs``, ``error``, ``weights_path``, start/finish times,
    ``retries`` (restarts after its process or node died) and ``placement`` (JSON: the Ray
    node, pid, GPU ids and torch device of its latest attempt). Added in schema v2.
    The columns ``accuracy``, ``size_mb``, ``backward_cost``, ``bops`` are the values of
    schemas v1/v2; they are still written when a trial carries those names (so an older
    qsearch can read a newer store), but values are read from ``qsearch_trial_values``.
``qsearch_trial_values`` [study_id, trial_number, name]
    a finished trial's values by objective name (the registry's names,
    :mod:`qsearch.config.objectives`; reported-only ones such as ``test_accuracy`` too).
    Added in schema v3; the upgrade from v2 copies the old columns here under their names.
``qsearch_epoch_metrics`` [study_id, trial_number, epoch]
    what the trainer reported after each epoch; the common metrics as columns, everything
    (method metrics such as ``lts.frozen_fraction`` included) in ``metrics`` (JSON).
``qsearch_layers`` [study_id, trial_number, idx]
    the cost model's per-layer record at the end of a finished trial: name, kind, params,
    MACs, weight/activation/gradient bits, time-averaged frozen fraction.
``qsearch_pareto_snapshots`` [study_id, snapshot]
    one row each time a trial completes: the trial that triggered it, how many COMPLETE
    trials it covers, the hypervolume and the reference point it was computed against.
``qsearch_pareto_points`` [study_id, snapshot, trial_number]
    the non-dominated COMPLETE trials of that snapshot and whether the point is the knee
    (the old value columns as in ``qsearch_trials``).
``qsearch_pareto_values`` [study_id, snapshot, trial_number, name]
    the objective values each front point was computed on, by name. Added in schema v3.
"""

from __future__ import annotations

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
)

SCHEMA_VERSION = 3
PREFIX = "qsearch_"

metadata = MetaData()

schema_version = Table(
    "qsearch_schema_version", metadata,
    Column("id", Integer, primary_key=True),  # always 1
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


def _study_fk() -> ForeignKey:
    """A fresh FK per column (SQLAlchemy binds each ForeignKey object to one column)."""
    return ForeignKey("qsearch_studies.id", ondelete="CASCADE")


trials = Table(
    "qsearch_trials", metadata,
    Column("study_id", Integer, _study_fk(), primary_key=True),
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
    # v3: False when a constraint was violated (NULL: none recorded, i.e. feasible); the
    # earlier trial whose result a repeated config reused. Neither kind is ever on a front.
    Column("feasible", Boolean),
    Column("reused_from", Integer),
)

epoch_metrics = Table(
    "qsearch_epoch_metrics", metadata,
    Column("study_id", Integer, _study_fk(), primary_key=True),
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
    Column("study_id", Integer, _study_fk(), primary_key=True),
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
    Column("study_id", Integer, _study_fk(), primary_key=True),
    Column("snapshot", Integer, primary_key=True, autoincrement=False),
    Column("trigger_trial", Integer),
    Column("n_complete", Integer, nullable=False),
    Column("hypervolume", Float),
    Column("reference_point", JSON),
    Column("created_at", DateTime, nullable=False),
)

pareto_points = Table(
    "qsearch_pareto_points", metadata,
    Column("study_id", Integer, _study_fk(), primary_key=True),
    Column("snapshot", Integer, primary_key=True, autoincrement=False),
    Column("trial_number", Integer, primary_key=True, autoincrement=False),
    Column("accuracy", Float),
    Column("size_mb", Float),
    Column("backward_cost", Float),
    Column("is_knee", Boolean, nullable=False, default=False),
)

trial_values = Table(
    "qsearch_trial_values", metadata,
    Column("study_id", Integer, _study_fk(), primary_key=True),
    Column("trial_number", Integer, primary_key=True, autoincrement=False),
    Column("name", String(100), primary_key=True),
    Column("value", Float),  # NULL: reported, but not a finite number
)

pareto_values = Table(
    "qsearch_pareto_values", metadata,
    Column("study_id", Integer, _study_fk(), primary_key=True),
    Column("snapshot", Integer, primary_key=True, autoincrement=False),
    Column("trial_number", Integer, primary_key=True, autoincrement=False),
    Column("name", String(100), primary_key=True),
    Column("value", Float),
)

ALL_TABLES = [schema_version, studies, trials, epoch_metrics, layers, pareto_snapshots,
              pareto_points, trial_values, pareto_values]

#: Value columns of schema v1/v2, still filled for older readers (see the module docstring).
LEGACY_TRIAL_VALUES = ("accuracy", "size_mb", "backward_cost", "bops")
LEGACY_POINT_VALUES = ("accuracy", "size_mb", "backward_cost")
