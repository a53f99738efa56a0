"""Per-layer search spaces by pattern: ``layers.*.w_bits`` becomes one dimension per layer.

A search-space key ``layers.<pattern>.<field>`` whose ``<pattern>`` is a glob (it contains
``*``, ``?`` or ``[``; matched with :func:`fnmatch.fnmatchcase` against the module name, so
``*`` also crosses dots: ``layer1.*`` matches ``layer1.0.conv1``) or a regular expression
``re:<regex>`` (a full match, as the trainer matches ``re:`` rules) is expanded, for the
study's model, into one dimension per matching quantizable layer, named by the layer:
``layers.*.w_bits`` on tiny-cnn becomes ``layers.stage1.0.w_bits``, ``layers.stage2.0.0.w_bits``,
``layers.stage3.0.w_bits`` and ``layers.fc.w_bits``, each with the pattern's distribution.

Precedence: a key that names a layer exactly wins over any pattern matching that layer; two
patterns matching the same layer for the same field are an error (which one should win is
not obvious). A pattern that matches no layer is a :class:`~qsearch.errors.ConfigError`
naming the model's layers. Fixed values (bare scalars) expand the same way.

(In the *base* config, ``layers: {re:...: {w_bits: 4}}`` stays a single rule shared by the
layers it matches; only search-space keys are expanded.)

The model is built once on CPU per (model, num_classes, in_channels) to read its layer
names; nothing is trained and no data is loaded.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any

from qsearch.config import StudySpec
from qsearch.config.catalog import model_info
from qsearch.errors import ConfigError

GLOB_CHARS = ("*", "?", "[")
#: Channels/classes of the built-in datasets (layer names do not depend on them, but the
#: model is built as the trainer builds it).
_DATASET_SHAPES = {"digits": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}


def split_layer_key(path: str) -> tuple[str, str] | None:
    """``layers.<key>.<field>`` -> (key, field); None for any other path."""
    parts = path.split(".")
    if parts[0] != "layers" or len(parts) < 3:
        return None
    return ".".join(parts[1:-1]), parts[-1]


def is_pattern(key: str) -> bool:
    """True for a layer key that is a glob or a ``re:`` regex (not an exact module name)."""
    return key.startswith("re:") or any(c in key for c in GLOB_CHARS)


def match_layers(key: str, names: list[str], field: str = "") -> list[str]:
    """The layers (in model order) a pattern key matches; ConfigError naming the layers when
    it matches none or is not a valid regex."""
    if key.startswith("re:"):
        try:
            rx = re.compile(key[3:])
        except re.error as e:
            raise ConfigError(field or f"layers.{key}", f"not a valid regular expression: {e}"
                              ) from None
        hit = [n for n in names if rx.fullmatch(n)]
        what = f"the regex {key[3:]!r} matches no layer (it must match a whole name)"
    else:
        hit = [n for n in names if fnmatch.fnmatchcase(n, key)]
        what = f"the pattern {key!r} matches no layer"
    if not hit:
        raise ConfigError(field or f"layers.{key}",
                          f"{what}; the quantizable layers are: {', '.join(names)}")
    return hit


def model_shape(spec: StudySpec) -> tuple[int, int]:
    """(num_classes, in_channels) the trainer would build the spec's model with."""
    cfg = spec.base_config()
    if cfg.dataset in _DATASET_SHAPES:
        return _DATASET_SHAPES[cfg.dataset]
    if cfg.dataset == "synthetic":
        return cfg.data.num_classes, cfg.data.channels
    info = model_info(cfg.model)
    head = ((info.input_hint if info else "") or "3").split("x")[0]
    return cfg.data.num_classes, int(head) if head.isdigit() else 3


@functools.lru_cache(maxsize=64)
def _layer_info(model: str, num_classes: int, in_channels: int) -> tuple[tuple[str, int], ...]:
    from qsearch.models import build_model
    from qsearch.quant.precision import QUANTIZABLE

    try:
        net = build_model(model, num_classes, in_channels)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder bug must not become a traceback here
        raise ConfigError("model", f"{model!r} could not be built to read its layers: "
                          f"{type(e).__name__}: {e}") from e
    return tuple((n, int(m.weight.numel())) for n, m in net.named_modules()
                 if isinstance(m, QUANTIZABLE))


def layer_names(spec: StudySpec) -> list[str]:
    """Quantizable (conv/linear) layer names of the spec's model, in forward order (cached)."""
    return [n for n, _ in _layer_info(spec.model, *model_shape(spec))]


def layer_params(spec: StudySpec) -> dict[str, int]:
    """Weight count of every quantizable layer of the spec's model (cached)."""
    return dict(_layer_info(spec.model, *model_shape(spec)))


def has_patterns(spec: StudySpec) -> bool:
    return any((k := split_layer_key(p)) is not None and is_pattern(k[0])
               for p in spec.search_space)


def expand_search_space(spec: StudySpec, names: list[str] | None = None) -> StudySpec:
    """The spec with every pattern key of its search space replaced by one key per matching
    layer (see the module docstring). Order: keys keep their place; a pattern's expansion
    takes the pattern's place, in model order. A spec without pattern keys is returned as is
    (no model is built), so calling this twice is harmless.

    ``names``: the model's quantizable layers, if known (else the model is built once)."""
    if not has_patterns(spec):
        return spec
    names = list(names) if names is not None else layer_names(spec)
    exact = {p for p in spec.search_space
             if (k := split_layer_key(p)) is not None and not is_pattern(k[0])}
    owner: dict[str, str] = {}  # expanded path -> the pattern key that produced it
    out: dict[str, Any] = {}
    for path, dist in spec.search_space.items():
        k = split_layer_key(path)
        if k is None or not is_pattern(k[0]):
            out[path] = dist
            continue
        key, leaf = k
        for layer in match_layers(key, names, field=f"search_space.{path}"):
            target = f"layers.{layer}.{leaf}"
            if target in exact:
                continue  # a key naming the layer exactly wins over the pattern
            if target in owner:
                raise ConfigError(f"search_space.{path}", f"matches layer {layer!r}, which "
                                  f"{owner[target]!r} also sets; make the patterns disjoint "
                                  "or name the layer exactly")
            owner[target] = path
            out[target] = dist
    data = spec.model_dump(mode="python")
    data["search_space"] = {p: d.model_dump() for p, d in out.items()}
    return StudySpec.model_validate(data)


def describe_expansion(spec: StudySpec, expanded: StudySpec) -> dict[str, list[str]]:
    """Pattern key -> the expanded keys it produced (for ``qsearch space``)."""
    names = layer_names(spec) if has_patterns(spec) else []
    out: dict[str, list[str]] = {}
    for path in spec.search_space:
        k = split_layer_key(path)
        if k is None or not is_pattern(k[0]):
            continue
        hits = match_layers(k[0], names, field=f"search_space.{path}")
        out[path] = [t for t in (f"layers.{n}.{k[1]}" for n in hits)
                     if t in expanded.search_space and t not in spec.search_space]
    return out

