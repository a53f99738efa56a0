"""The study spec: what to search, how, where to store it (pydantic v2, versioned).

A :class:`StudySpec` names a model, a dataset, a base
:class:`~qsearch.config.trial.TrialConfig`, the objectives (names from the objective
registry, :mod:`qsearch.config.objectives`), the budget, the per-trial resources, the
sampler/scheduler and a search space (:mod:`qsearch.config.space`) that maps *dotted
TrialConfig paths* (``w_bits``, ``methods.lts.warmup_frac``) to distributions.

Everything is checked before anything runs: every path must exist in TrialConfig, every range
must be non-empty, and every value the sampler could hand out at a boundary (categorical
choices, range endpoints, fixed values) is turned into a real TrialConfig — so a value the
trainer would reject is a :class:`~qsearch.errors.ConfigError` naming ``search_space.<path>``
at load time, not a failed trial an hour later. Torch-free.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from qsearch.config import objectives as objective_registry
from qsearch.config.base import StrictModel, config_error_from_validation, set_dotted
from qsearch.config.defaults import DEFAULT_STORAGE
from qsearch.config.files import read_mapping
from qsearch.config.space import (
    CategoricalDist,
    Distribution,
    FixedDist,
    FloatDist,
    IntDist,
    check_asha,
    check_path,
)
from qsearch.config.trial import TrialConfig, import_plugins, parse_trial_config
from qsearch.errors import ConfigError

STUDY_SPEC_VERSION = 1
DEFAULT_OBJECTIVES = ("val_accuracy", "size_mb", "backward_flops")


# --------------------------------------------------------------------------- sections


class Budget(StrictModel):
    num_trials: int = Field(16, ge=1)
    max_concurrent: int = Field(2, ge=1)
    time_limit_s: float | None = Field(None, gt=0)


class Resources(StrictModel):
    """Per trial; fractional GPUs pack several trials on one device (``gpu: 0.5``)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class SamplerSpec(StrictModel):
    type: Literal["nsga2", "tpe", "gp", "random"] = "nsga2"
    seed: int | None = 0
    #: Extra keyword arguments for the Optuna sampler (e.g. ``population_size`` for nsga2).
    options: dict[str, Any] = Field(default_factory=dict)
    #: Seed the study with per-layer bit assignments chosen from the warm-started model's
    #: per-layer Hessian sensitivity (qsearch.search.sensitivity); needs per-layer
    #: ``layers.<name or pattern>.w_bits`` dimensions in the search space.
    sensitivity: bool = False
    #: How many such seeds (one per average-bit budget) are enqueued before sampling.
    sensitivity_seeds: int = Field(4, ge=1, le=64)


class SchedulerSpec(StrictModel):
    """``none`` runs every trial to the end; ``asha`` stops weak trials at rungs (PRUNED) on
    ``metric`` alone; ``pareto`` uses ASHA's rungs but stops a trial only when, at its rung, it
    is dominated on all the study's objectives (sizes and modelled costs are known from the
    config, accuracy and executed costs are read at the rung), so a small, cheap model that is
    a little less accurate keeps running.

    ``metric`` is the per-epoch figure ASHA compares: ``val_accuracy`` (``accuracy`` is its
    per-epoch alias, kept for specs written before validation splits)."""

    type: Literal["none", "asha", "pareto"] = "none"
    metric: Literal["val_accuracy", "accuracy"] = "val_accuracy"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class Bound(StrictModel):
    """A feasibility bound on one objective: ``max`` and/or ``min``."""

    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_side(self) -> Bound:
        if self.max is None and self.min is None:
            raise ValueError("give max, min or both")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"empty range: min ({self.min}) > max ({self.max})")
        return self

    def violation(self, value: float) -> float:
        """Optuna's constraint value: <= 0 when feasible, the distance outside otherwise."""
        over = value - self.max if self.max is not None else -float("inf")
        under = self.min - value if self.min is not None else -float("inf")
        return float(max(over, under))


class ArtifactsSpec(StrictModel):
    """Where trials keep their files.

    ``dir`` (a filesystem path) holds each finished trial's weights; it defaults to
    ``qsearch_artifacts`` beside a SQLite database file (or in the working directory). On a
    cluster point it at a path every node mounts. ``keep: pareto`` deletes the weights of
    trials that fall off the Pareto front.

    ``checkpoints`` is Ray Tune's storage path for per-epoch trial checkpoints, which a trial
    resumes from after its worker dies: a shared filesystem path or an object-store URI such
    as ``s3://bucket/prefix`` (through Ray's pyarrow filesystems). Default: ``<dir>/ray_results``.
    """

    dir: str | None = None
    keep: Literal["pareto", "all"] = "pareto"
    checkpoints: str | None = None

    @field_validator("dir")
    @classmethod
    def _dir_is_a_path(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(f"must be a filesystem path, got the URI {v!r}; put object-store "
                             "URIs in artifacts.checkpoints, or mount the bucket as a path")
        return v


class FailureSpec(StrictModel):
    """Fault tolerance. A trial whose process or node dies (OOM kill, lost worker) is restarted
    from its last epoch checkpoint up to ``max_failures`` times, then recorded as FAIL. Errors
    the trainer raises itself (bad config, NaN loss) are deterministic and fail at once."""

    max_failures: int = Field(2, ge=0)


# --------------------------------------------------------------------------- the spec


class StudySpec(StrictModel):
    version: Literal[1] = STUDY_SPEC_VERSION
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    storage: str = DEFAULT_STORAGE
    model: str = "tiny-cnn"
    dataset: str = "digits"
    base: dict[str, Any] = Field(default_factory=dict)
    objectives: list[str] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search_space: dict[str, Distribution] = Field(default_factory=dict)
    #: Hypervolume reference point per objective; missing objectives get a default from the
    #: observed values (stored with every snapshot).
    reference_point: dict[str, float] = Field(default_factory=dict)
    artifacts: ArtifactsSpec = Field(default_factory=ArtifactsSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    #: Feasibility bounds per objective name (``size_mb: {max: 0.02}``): told to the sampler
    #: through Optuna's constraint API; infeasible trials are stored as such and never on the
    #: front. A bound on a value known from the config alone skips training the trial.
    constraints: dict[str, Bound] = Field(default_factory=dict)
    #: Train each config with this many seeds (``seed``, ``seed+1``, ...); the study
    #: optimizes the mean and stores every seed's values and the spread.
    repeats: int = Field(1, ge=1, le=10)

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, data: Any) -> Any:
        """Plug-ins named in ``base.plugins`` register their objectives and methods before
        ``objectives`` and the search space are checked against the registries."""
        if isinstance(data, dict) and isinstance(data.get("base"), dict):
            import_plugins(data["base"].get("plugins"), field="base.plugins")
        return data

    @field_validator("search_space", mode="before")
    @classmethod
    def _bare_values_are_fixed(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {k: d if isinstance(d, dict) and "type" in d else {"type": "fixed", "value": d}
                for k, d in v.items()}

    @field_validator("objectives")
    @classmethod
    def _registered_objectives(cls, v: list[str]) -> list[str]:
        known = [o.name for o in objective_registry.objectives() if o.optimizable]
        for name in v:
            try:
                obj = objective_registry.get_objective(name)
            except KeyError:
                raise ValueError(f"unknown objective {name!r}; choose from "
                                 f"{', '.join(known)}") from None
            if not obj.optimizable:
                raise ValueError(
                    f"{name!r} is reported, not optimized: selecting trials on it would bias "
                    f"the front it is meant to check (use val_accuracy; {name} is measured "
                    f"once per finished trial and stored beside it)")
        for name in v:
            notice = objective_registry.deprecation_notice(name)
            if notice:
                warnings.warn(notice, FutureWarning, stacklevel=2)
        # Names stay as written (an old name keeps matching the values a store holds under
        # it); the registry resolves them wherever a value is read.
        if len(v) < 2:
            raise ValueError(f"give at least two of {', '.join(known)}")
        if len({objective_registry.resolve_name(n) for n in v}) != len(v):
            raise ValueError("objectives must be distinct")
        return v

    @field_validator("constraints", "reference_point")
    @classmethod
    def _keys_are_objectives(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Keys name registered objectives (as written: an old name stays valid)."""
        for name in v:
            try:
                objective_registry.get_objective(name)
            except KeyError:
                raise ValueError(f"unknown objective {name!r}; choose from "
                                 f"{', '.join(objective_registry.objective_names())}") from None
        return v

    @model_validator(mode="after")
    def _check_against_trial_config(self) -> StudySpec:
        base = self.base_config()
        for path in ("data.val_fraction", "data.split_seed", "data.test_fraction"):
            if path in self.searched():
                raise ConfigError(f"search_space.{path}", "every trial of a study must be "
                                  "scored on the same validation and test split; fix it in "
                                  "base instead of searching it")
        if base.data.val_fraction == 0:
            raise ConfigError(
                "base.data.val_fraction", "a search needs a validation split to select on: "
                "with 0 there is no validation data, and choosing trials on the test split "
                "would bias the front and leave no unseen data to report; use e.g. 0.2")
        for path, dist in self.search_space.items():
            check_path(path)
            for value in dist.boundary_values():
                data = base.model_dump()
                set_dotted(data, path, value)
                try:
                    TrialConfig.model_validate(data)
                except (ValidationError, ConfigError) as e:
                    inner = config_error_from_validation(e) if isinstance(e, ValidationError) else e
                    raise ConfigError(f"search_space.{path}",
                                      f"value {value!r} is rejected by the trainer ({inner})") from None
        if not self.searched():
            fixed = ", ".join(self.search_space)
            raise ConfigError("search_space", (
                f"nothing to search: it only fixes {fixed}" if fixed else
                "nothing to search: the search space is missing or empty") + "; add at least "
                "one searched dimension, e.g. w_bits: {type: categorical, choices: [2, 4, 8]}")
        if self.scheduler.type != "none":
            check_asha(self.scheduler.grace_period, self.max_epochs())
            if self.repeats > 1:
                raise ConfigError("repeats", "repeats > 1 needs scheduler.type: none (a rung "
                                  "decision would see only the first seed)")
        if self.sampler.sensitivity and not any(
                p.startswith("layers.") and p.endswith(".w_bits") for p in self.searched()):
            raise ConfigError("sampler.sensitivity", "seeds per-layer weight bits, but the "
                              "search space has no layers.<name or pattern>.w_bits dimension; "
                              "add e.g. layers.*.w_bits: {type: int, low: 2, high: 8}")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def directions(self) -> list[str]:
        return [objective_registry.direction_of(o) for o in self.objectives]

    def base_data(self) -> dict[str, Any]:
        """The base TrialConfig mapping with model, dataset and fixed values applied."""
        data = copy.deepcopy(self.base)
        for key in ("model", "dataset"):
            if key in data and data[key] != getattr(self, key):
                raise ConfigError(f"base.{key}", f"conflicts with the spec's {key} "
                                  f"{getattr(self, key)!r}; set it in one place")
            data[key] = getattr(self, key)
        for path, dist in self.search_space.items():
            if isinstance(dist, FixedDist):
                set_dotted(data, path, dist.value)
        return data

    def base_config(self) -> TrialConfig:
        return parse_trial_config(self.base_data(), prefix="base")

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The TrialConfig of one trial: base + fixed values + sampled ``params`` (dotted)."""
        data = self.base_data()
        for path, value in params.items():
            set_dotted(data, path, value)
        return parse_trial_config(data)

    def searched(self) -> dict[str, FloatDist | IntDist | CategoricalDist]:
        return {k: d for k, d in self.search_space.items() if not isinstance(d, FixedDist)}

    def max_epochs(self) -> int:
        """The longest a trial can run (ASHA's max_t), also when ``epochs`` is searched."""
        dist = self.search_space.get("epochs")
        if dist is None:
            return self.base_config().epochs
        return int(max(v for v in dist.boundary_values()))

    def _hashed(self, exclude: set[str]) -> str:
        data = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def explicit_paths(self) -> set[str]:
        """Dotted paths of the values the spec's author set (not left at their defaults):
        leaf fields, and mapping-valued fields (``base``, ``search_space``) as a whole."""
        out: set[str] = set()

        def walk(model: StrictModel, prefix: str) -> None:
            for name in model.model_fields_set:
                value = getattr(model, name)
                if isinstance(value, StrictModel):
                    walk(value, f"{prefix}{name}.")
                else:
                    out.add(f"{prefix}{name}")

        walk(self, "")
        return out

    def spec_hash(self) -> str:
        """Content hash of everything that defines the study (not where it is stored)."""
        return self._hashed({"storage"})

    def search_hash(self) -> str:
        """Hash of what makes trials comparable; budget/resources may change on resume."""
        return self._hashed({"storage", "budget", "resources", "artifacts", "failure"})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def parse_study_spec(data: dict[str, Any]) -> StudySpec:
    """Validate a mapping as a StudySpec; the first problem becomes a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"a study spec is a mapping, got {type(data).__name__}")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        err = config_error_from_validation(e, root=StudySpec)
        first = e.errors()[0]
        loc = first["loc"]
        if first["type"] == "extra_forbidden" and len(loc) == 1:
            fields = list(StudySpec.model_fields)
            close = difflib.get_close_matches(str(loc[0]), fields, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(str(loc[0]), f"not a study spec field; {hint}the fields are "
                              f"{', '.join(fields)}") from None
        # Name the search-space key, not pydantic's union tag (search_space.lr.float.low).
        if len(loc) >= 2 and loc[0] == "search_space":
            key = f"search_space.{loc[1]}"
            detail = str(err).removeprefix(f"{err.field}: ")
            where = err.field.removeprefix(key).lstrip(".").removeprefix("float").removeprefix(
                "int").removeprefix("categorical").removeprefix("fixed").lstrip(".")
            raise ConfigError(key, f"{where + ': ' if where else ''}{detail}") from None
        raise err from None


def load_study_spec(path: str | Path, storage: str | None = None,
                    name: str | None = None) -> StudySpec:
    """Read a YAML study spec (``yaml.safe_load``); ``storage``/``name`` override the file."""
    data = read_mapping(path, what="study spec")
    if storage:
        data["storage"] = storage
    if name:
        data["name"] = name
    return parse_study_spec(data)
