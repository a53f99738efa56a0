"""The objective registry: every number a study can optimize, and what it is.

An :class:`Objective` says how a value is read from a finished trial (``metric_key`` in the
trainer's final metrics), which way is better, its unit and label (CLI, dashboards, exports
all print these, never a hard-coded name), and *what kind of figure it is*:

* ``measured``  — timed or evaluated on the trial's device (accuracy, seconds);
* ``executed``  — counted from the operations that really ran;
* ``computed``  — exact arithmetic on the config and the model (size from bits and params);
* ``modelled``  — a formula for hypothetical hardware, not executed anywhere.

Adding an objective is one :func:`register_objective` call plus the code that puts
``metric_key`` into the trainer's metrics; the study spec, the store (values are stored by
name), ``qsearch pareto``, export and the dashboards pick it up from here. The registry is
torch-free, like everything in :mod:`qsearch.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]
Kind = Literal["measured", "executed", "computed", "modelled"]


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Direction
    label: str
    unit: str = ""
    kind: Kind = "measured"
    #: Key of the value in the trainer's per-epoch/final metrics (usually ``name``).
    metric_key: str = ""
    #: How a trial's value is formed from its epochs: the final epoch's value.
    aggregate: Literal["final"] = "final"
    #: Known from the config alone, before any training (sizes, modelled costs).
    known_before_training: bool = False
    #: False for a figure that is reported but must never be selected on (test accuracy: a
    #: front chosen on the test split is biased, so the study spec rejects it as an objective).
    optimizable: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if not self.metric_key:
            object.__setattr__(self, "metric_key", self.name)

    @property
    def axis_title(self) -> str:
        """Label with unit and kind for a plot axis, e.g. ``size (MB, computed)``."""
        inner = ", ".join(p for p in (self.unit, self.kind) if p)
        return f"{self.label} ({inner})" if inner else self.label

    @property
    def better(self) -> str:
        return "higher is better" if self.direction == "maximize" else "lower is better"


_OBJECTIVES: dict[str, Objective] = {}
_ALIASES: dict[str, str] = {}


def register_objective(obj: Objective, *, replace: bool = False) -> Objective:
    """Add ``obj`` to the registry (a name registered twice is an error unless ``replace``)."""
    if obj.direction not in ("maximize", "minimize"):
        raise ValueError(f"objective {obj.name!r}: direction must be maximize or minimize")
    if obj.name in _OBJECTIVES and not replace and _OBJECTIVES[obj.name] != obj:
        raise ValueError(f"objective {obj.name!r} is already registered")
    _OBJECTIVES[obj.name] = obj
    return obj


def unregister_objective(name: str) -> None:
    """Remove a registered objective (for tests and plug-ins that register temporarily)."""
    _OBJECTIVES.pop(name, None)


_DEPRECATED: dict[str, str] = {}


def register_alias(old: str, new: str, *, deprecated: str = "") -> None:
    """``old`` keeps working in specs as the previous name of ``new``; ``deprecated`` is the
    one-line notice a spec that still uses ``old`` gets when it is parsed."""
    _ALIASES[old] = new
    if deprecated:
        _DEPRECATED[old] = deprecated


def deprecation_notice(name: str) -> str | None:
    """The deprecation notice of an old objective name, or None."""
    return _DEPRECATED.get(name)


def resolve_name(name: str) -> str:
    return _ALIASES.get(name, name)


def get_objective(name: str) -> Objective:
    """The registered objective ``name`` (KeyError if unknown; callers name the field)."""
    return _OBJECTIVES[resolve_name(name)]


def objective_names() -> list[str]:
    return list(_OBJECTIVES)


def objectives() -> list[Objective]:
    return list(_OBJECTIVES.values())


def label_of(name: str) -> str:
    """Axis title of a registered objective, or the bare name for one a store knows and this
    installation does not (a study written by a plug-in that is not installed)."""
    try:
        return get_objective(name).axis_title
    except KeyError:
        return name


def direction_of(name: str) -> Direction:
    return get_objective(name).direction


# ----------------------------------------------------------------------------- built-ins

VAL_ACCURACY = register_objective(Objective(
    "val_accuracy", "maximize", "validation accuracy", unit="top-1", kind="measured",
    description="top-1 accuracy of the final model on the validation split (carved from the "
                "training split, data.val_fraction); what the sampler and scheduler select on"))
TEST_ACCURACY = register_objective(Objective(
    "test_accuracy", "maximize", "test accuracy", unit="top-1", kind="measured",
    optimizable=False,
    description="top-1 accuracy of the final model on the test split, measured once when a "
                "trial finishes; reported, never optimized (selecting on it biases the front)"))
#: Stores written before validation splits existed optimized ``accuracy``, measured on the
#: test split; it stays registered so they still load and print.
ACCURACY = register_objective(Objective(
    "accuracy", "maximize",
    "accuracy (old name: the test split in stores before validation splits, val_accuracy since)",
    unit="top-1", kind="measured",
    description="studies written before validation splits optimized it on the test split; "
                "newer trials report it as an alias of val_accuracy; new studies use "
                "val_accuracy"))
SIZE_MB = register_objective(Objective(
    "size_mb", "minimize", "size", unit="MB", kind="computed", known_before_training=True,
    description="weights at their bit widths plus FP32 extras (BN, biases, step sizes)"))
BOPS = register_objective(Objective(
    "bops", "minimize", "inference bit-operations", unit="BOPs / sample", kind="modelled",
    known_before_training=True,
    description="a model of low-precision inference cost: forward MACs of each quantized "
                "layer times its weight and activation bits, per sample"))
# Training cost, three ways (METHODS.md §7). All are ratios to dense FP32 training of the same
# model (1.0 = FP32), over the whole trial (every stage and extra forward included).
BACKWARD_FLOPS = register_objective(Objective(
    "backward_flops", "minimize", "backward FLOPs", unit="x FP32", kind="executed",
    description="GEMM FLOPs the backward really ran per training sample (dX, the dW rows that "
                "were not skipped, plus extra forwards: teacher, FP suffixes, hypernetwork), "
                "over the whole trial, as a ratio to dense FP32 training of the same model; "
                "fake-quantized operands cost FP32 FLOPs"))
BACKWARD_TIME = register_objective(Objective(
    "backward_time", "minimize", "backward time", unit="s / sample", kind="measured",
    description="wall seconds of the backward per training sample on the trial's device, over "
                "the whole trial; backward_time_ratio (beside it in the metrics) divides it by "
                "a plain FP32 step of the same model measured on the same worker"))
BACKWARD_BOPS = register_objective(Objective(
    "backward_bops", "minimize",
    "backward bit-operations on low-precision training hardware; not executed here",
    unit="x FP32 BOPs", kind="modelled", known_before_training=False,
    description="a model: bit-operations of the backward on hypothetical integer training "
                "hardware at the operands' bit widths, with LTS-frozen elements free, as a "
                "ratio to FP32 training (formerly backward_cost)"))
register_alias("backward_cost", "backward_bops", deprecated=(
    "objective 'backward_cost' is now 'backward_bops' (modelled bit-operations on "
    "low-precision hardware, not executed); use 'backward_bops', or 'backward_flops' for the "
    "FLOPs that really run"))
