"""The configuration layer: trial config, study spec, search space, objectives, defaults.

Everything a user writes (a study spec, a trial config, ``--set`` overrides) is parsed and
checked here, and nothing here imports torch, so reading a spec, ``qsearch studies`` and
``qsearch pareto`` start fast. The registries (objectives, methods, model/dataset names) are
the extension points: see ``docs/DESIGN.md``.
"""

from qsearch.config.base import ALLOWED_BITS, FP32_BITS, StrictModel, apply_overrides, set_dotted
from qsearch.config.defaults import DEFAULT_STORAGE
from qsearch.config.files import read_mapping
from qsearch.config.methods import MethodConfig, MethodEntry, method_entries, register_method
from qsearch.config.objectives import Objective, get_objective, register_objective
from qsearch.config.space import CategoricalDist, FixedDist, FloatDist, IntDist, check_path
from qsearch.config.study import StudySpec, load_study_spec, parse_study_spec
from qsearch.config.trial import (
    DataConfig,
    LayerRule,
    TrialConfig,
    WarmStartConfig,
    load_trial_config,
    parse_trial_config,
)

__all__ = [
    "ALLOWED_BITS", "DEFAULT_STORAGE", "FP32_BITS", "CategoricalDist", "DataConfig", "FixedDist",
    "FloatDist", "IntDist", "LayerRule", "MethodConfig", "MethodEntry", "Objective",
    "StrictModel", "StudySpec", "TrialConfig", "WarmStartConfig", "apply_overrides",
    "check_path", "get_objective", "load_study_spec", "load_trial_config", "method_entries",
    "parse_study_spec", "parse_trial_config", "read_mapping", "register_method",
    "register_objective", "set_dotted",
]
