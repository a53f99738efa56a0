"""QAT techniques as trainer plug-ins: one module per method, one registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsearch.errors import ConfigError
from qsearch.methods.base import (
    METHOD_ORDER,
    Method,
    MethodConfig,
    method_class,
    register_method,
    registered_methods,
)

if TYPE_CHECKING:
    from qsearch.spec import TrialConfig

__all__ = [
    "METHOD_ORDER",
    "Method",
    "MethodConfig",
    "build_methods",
    "check_combination",
    "method_class",
    "register_method",
    "registered_methods",
]


def _import_all() -> None:
    # Importing the modules registers their Method classes.
    from qsearch.methods import blockrep, csq, gradq, lts, tr  # noqa: F401


def check_combination(config: TrialConfig) -> None:
    """Reject method settings that cannot work together (called by TrialConfig validation).

    Raises ConfigError naming the field, so a study spec fails before anything runs.
    """
    _import_all()
    for name in config.methods.enabled():
        if name not in registered_methods():
            raise ConfigError(f"methods.{name}.enabled", f"method {name!r} is not available")
    for name in config.methods.enabled():
        cls = method_class(name)
        check = getattr(cls, "check_config", None)
        if check is not None:
            check(config)


def build_methods(config: TrialConfig) -> list[Method]:
    """Instantiate the enabled methods in METHOD_ORDER."""
    _import_all()
    return [
        method_class(name)(getattr(config.methods, name))
        for name in METHOD_ORDER
        if getattr(config.methods, name).enabled
    ]
