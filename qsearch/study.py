"""The study spec: what to search, how, where to store it (pydantic v2, versioned).

A :class:`StudySpec` names a model, a dataset, a base :class:`~qsearch.spec.TrialConfig`, the
objectives, the budget, the per-trial resources, the sampler/scheduler and a search space that
maps *dotted TrialConfig paths* (``w_bits``, ``methods.lts.warmup_frac``) to distributions.

Everything is checked before anything runs: every path must exist in TrialConfig, every range
must be non-empty, and every value the sampler could hand out at a boundary (categorical
choices, range endpoints, fixed values) is turned into a real TrialConfig — so a value the
trainer would reject is a :class:`~qsearch.errors.ConfigError` naming ``search_space.<path>``
at load time, not a failed trial an hour later.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from qsearch.errors import ConfigError
from qsearch.spec import (
    StrictModel,
    TrialConfig,
    config_error_from_validation,
    parse_trial_config,
    read_mapping,
    set_dotted,
)

STUDY_SPEC_VERSION = 1
DEFAULT_STORAGE = "sqlite:///qsearch.db"

#: Objective name -> Optuna direction. The order of ``objectives`` in a spec is the order of
#: the Optuna study's values.
OBJECTIVE_DIRECTIONS: dict[str, Literal["maximize", "minimize"]] = {
    "accuracy": "maximize",
    "size_mb": "minimize",
    "backward_cost": "minimize",
}
Objective = Literal["accuracy", "size_mb", "backward_cost"]
#: Int ranges up to this many values are checked value by value (bits 2..8 etc.).
_MAX_INT_VALUES_CHECKED = 64


# --------------------------------------------------------------------------- distributions


class FloatDist(StrictModel):
    """Uniform (or log-uniform with ``log: true``) float in [low, high]."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatDist:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high}); "
                             "use a fixed value for a constant")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self

    def boundary_values(self) -> list[Any]:
        return [self.low, self.high]


class IntDist(StrictModel):
    """Integer in [low, high] (inclusive), optional step or log scale."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntDist:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high}); "
                             "use a fixed value for a constant")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step != 1:
            raise ValueError("step and log cannot be combined")
        return self

    def boundary_values(self) -> list[Any]:
        values = list(range(self.low, self.high + 1, self.step))
        if self.log or len(values) > _MAX_INT_VALUES_CHECKED:
            return [self.low, values[-1]]
        return values  # small ranges (bit-widths): every value must be one the trainer takes


class CategoricalDist(StrictModel):
    """One of ``choices`` (str, int, float, bool or null, as Optuna stores them)."""

    type: Literal["categorical"] = "categorical"
    choices: list[Union[None, bool, int, float, str]]

    @field_validator("choices")
    @classmethod
    def _non_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("empty choices: give at least one value")
        if len({json.dumps(c) for c in v}) != len(v):
            raise ValueError("choices must be distinct")
        return v

    def boundary_values(self) -> list[Any]:
        return list(self.choices)


class FixedDist(StrictModel):
    """A constant: not searched, but set on every trial (a bare scalar in YAML means this)."""

    type: Literal["fixed"] = "fixed"
    value: Any

    def boundary_values(self) -> list[Any]:
        return [self.value]


Distribution = Annotated[Union[FloatDist, IntDist, CategoricalDist, FixedDist],
                         Field(discriminator="type")]


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


class SchedulerSpec(StrictModel):
    """``none`` runs every trial to the end; ``asha`` stops weak trials at rungs (PRUNED)."""

    type: Literal["none", "asha"] = "none"
    metric: Literal["accuracy"] = "accuracy"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


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
    objectives: list[Objective] = Field(
        default_factory=lambda: ["accuracy", "size_mb", "backward_cost"])
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    search_space: dict[str, Distribution] = Field(default_factory=dict)
    #: Hypervolume reference point per objective; missing objectives get a default from the
    #: observed values (stored with every snapshot).
    reference_point: dict[Objective, float] = Field(default_factory=dict)
    artifacts: ArtifactsSpec = Field(default_factory=ArtifactsSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)

    @field_validator("search_space", mode="before")
    @classmethod
    def _bare_values_are_fixed(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        return {k: d if isinstance(d, dict) and "type" in d else {"type": "fixed", "value": d}
                for k, d in v.items()}

    @field_validator("objectives")
    @classmethod
    def _two_objectives(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("give at least two of accuracy, size_mb, backward_cost")
        if len(set(v)) != len(v):
            raise ValueError("objectives must be distinct")
        return v

    @model_validator(mode="after")
    def _check_against_trial_config(self) -> StudySpec:
        base = self.base_config()
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
        if self.scheduler.type == "asha" and self.scheduler.grace_period >= self.max_epochs():
            raise ConfigError("scheduler.grace_period",
                              f"must be below the trial length ({self.max_epochs()} epochs), "
                              "or ASHA can never stop a trial early")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def directions(self) -> list[str]:
        return [OBJECTIVE_DIRECTIONS[o] for o in self.objectives]

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

    def spec_hash(self) -> str:
        """Content hash of everything that defines the study (not where it is stored)."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"storage"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def search_hash(self) -> str:
        """Hash of what makes trials comparable; budget/resources may change on resume."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"storage", "budget", "resources",
                                                                "artifacts", "failure"}),
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- paths


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated so we can see whether a field is a nested section."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def check_path(path: str) -> None:
    """Raise ConfigError unless ``path`` names a leaf field of TrialConfig.

    ``layers.<module name>.w_bits`` is allowed (module names may contain dots); whether the
    layer exists is only known once the model is built, so the trainer checks that.
    """
    field = f"search_space.{path}"
    parts = path.split(".")
    model: type[BaseModel] = TrialConfig
    i = 0
    while i < len(parts):
        part = parts[i]
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; fields here: {', '.join(fields)}"
            raise ConfigError(field, f"unknown TrialConfig path ({part!r} is not a field{hint})")
        if path.startswith("layers.") and part == "layers":
            from qsearch.spec import LayerRule

            if len(parts) < 3 or parts[-1] not in LayerRule.model_fields:
                raise ConfigError(field, "use layers.<module name>.w_bits or .a_bits")
            return
        ann = _unwrap(fields[part].annotation)
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        last = i == len(parts) - 1
        if is_section and last:
            raise ConfigError(field, f"is a section, not a value; name one of its fields: "
                              f"{', '.join(ann.model_fields)}")
        if not is_section and not last:
            raise ConfigError(field, f"{part!r} is a value, not a section")
        if is_section:
            model = ann
        i += 1


# --------------------------------------------------------------------------- loading


def parse_study_spec(data: dict[str, Any]) -> StudySpec:
    """Validate a mapping as a StudySpec; the first problem becomes a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"a study spec is a mapping, got {type(data).__name__}")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        err = config_error_from_validation(e)
        loc = e.errors()[0]["loc"]
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
    data = read_mapping(path)
    if storage:
        data["storage"] = storage
    if name:
        data["name"] = name
    return parse_study_spec(data)
