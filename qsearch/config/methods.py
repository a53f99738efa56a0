"""The method registry: each QAT technique's config section, its order, and its handler.

torchao-style dispatch: a method registers its *config type* here (torch-free) together with
the dotted path of the handler class that implements it (a
:class:`qsearch.methods.plugin.Method`, which needs torch and is imported only by the
trainer). So parsing ``methods.lts`` in a spec never imports the method's code, and adding a
method is its module(s) plus one :func:`register_method` call::

    register_method("mine", MyConfig, order=35, handler="mypkg.mine:MyMethod")

``order`` fixes when the trainer calls the methods' hooks (lower first): a precision stage
(CSQ) must run before anything that reads the bits, block replacement's branches before the
freezing rules look at gradients, and gradient quantization last, on the final gradients.

The built-ins are listed by module name in :data:`BUILTIN_CONFIG_MODULES` and imported on
first use of the registry; each of those modules registers itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict

from qsearch.config.base import StrictModel

if TYPE_CHECKING:
    from qsearch.config.trial import TrialConfig


class MethodConfig(StrictModel):
    """Base of each ``methods.<name>`` section: off by default, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False

    #: True for a method that chooses the layers' weight bits itself (a precision stage):
    #: other methods then cannot tell from the config alone which layers end up quantized.
    sets_precision: ClassVar[bool] = False

    def check(self, trial: TrialConfig) -> None:
        """Reject settings that cannot work with the rest of ``trial`` (raise ConfigError
        naming the field). Called for enabled methods when a TrialConfig is validated, so a
        study spec fails before anything runs."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[MethodConfig]
    order: int
    #: ``"package.module:ClassName"`` of the handler, or the class itself.
    handler: str | type

    def load_handler(self) -> type:
        if not isinstance(self.handler, str):
            return self.handler
        module, _, attr = self.handler.partition(":")
        return getattr(importlib.import_module(module), attr)


BUILTIN_CONFIG_MODULES = (
    "qsearch.methods.csq_config",
    "qsearch.methods.blockrep_config",
    "qsearch.methods.lts_config",
    "qsearch.methods.tr_config",
    "qsearch.methods.gradq_config",
)
_REGISTRY: dict[str, MethodEntry] = {}
_loaded = False


def _ensure_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN_CONFIG_MODULES:
            importlib.import_module(mod)


def register_method(name: str, config: type[MethodConfig], *, order: int,
                    handler: str | type) -> MethodEntry:
    """Register a method under its ``methods.<name>`` key (twice with another config is an
    error)."""
    if not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a Python identifier")
    old = _REGISTRY.get(name)
    if old is not None and old.config is not config:
        raise ValueError(f"method {name!r} is already registered with {old.config.__name__}")
    entry = MethodEntry(name, config, order, handler)
    _REGISTRY[name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Remove a method (for tests and plug-ins that register temporarily)."""
    _REGISTRY.pop(name, None)


def method_entries() -> list[MethodEntry]:
    """Every registered method, in hook order."""
    _ensure_builtins()
    return sorted(_REGISTRY.values(), key=lambda e: (e.order, e.name))


def method_entry(name: str) -> MethodEntry:
    _ensure_builtins()
    return _REGISTRY[name]


def method_names() -> list[str]:
    return [e.name for e in method_entries()]


def method_config_class(name: str) -> type[MethodConfig] | None:
    _ensure_builtins()
    entry = _REGISTRY.get(name)
    return entry.config if entry else None


def parse_methods(data: Any) -> dict[str, MethodConfig]:
    """Validate a ``methods`` mapping into one config per registered method (defaults for
    the ones not given)."""
    from pydantic import ValidationError

    from qsearch.config.base import config_error_from_validation
    from qsearch.errors import ConfigError

    if data is None:
        data = {}
    if not isinstance(data, dict):
        if isinstance(data, MethodsView):
            return dict(data.sections)
        raise ConfigError("methods", f"expected a mapping of method sections, got "
                          f"{type(data).__name__}")
    names = method_names()
    for key in data:
        if key not in names:
            raise ConfigError(f"methods.{key}", f"unknown method; choose one of {', '.join(names)}")
    out: dict[str, MethodConfig] = {}
    for entry in method_entries():
        raw = data.get(entry.name, {})
        if isinstance(raw, MethodConfig):
            out[entry.name] = raw
            continue
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"methods.{entry.name}", "expected a mapping of this method's "
                              f"fields ({', '.join(entry.config.model_fields)})")
        try:
            out[entry.name] = entry.config.model_validate(raw)
        except ValidationError as e:
            raise config_error_from_validation(e, prefix=f"methods.{entry.name}",
                                               root=entry.config) from None
    return out


class MethodsView:
    """The ``methods`` section of a TrialConfig: one config per registered method, read as
    attributes (``cfg.methods.lts.enabled``) or by name (``cfg.methods["lts"]``)."""

    __slots__ = ("sections",)

    def __init__(self, sections: dict[str, MethodConfig]):
        object.__setattr__(self, "sections", sections)

    def __getattr__(self, name: str) -> MethodConfig:
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(f"no method {name!r} is registered") from None

    def __getitem__(self, name: str) -> MethodConfig:
        return self.sections[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a TrialConfig's methods are read-only; use model_copy(update=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodsView) and self.sections == other.sections

    def __repr__(self) -> str:
        return f"MethodsView({', '.join(self.enabled()) or 'none enabled'})"

    def enabled(self) -> list[str]:
        """Names of the enabled methods, in hook order."""
        return [n for n in method_names() if n in self.sections and self.sections[n].enabled]

    def dump(self, mode: str = "python") -> dict[str, Any]:
        return {n: c.model_dump(mode=mode) for n, c in self.sections.items()}
