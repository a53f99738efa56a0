"""Checks a study spec must pass before the store or Ray is touched, where the spec alone
cannot tell: the model's layers (needs torch) and the cluster's resources (needs Ray).

``qsearch launch`` runs :func:`check_launch` right after the spec is loaded, so a bad spec
exits 2 with one line and nothing written. The driver runs :func:`check_cluster` after
``init_ray``, when the cluster is known.

* :func:`check_layers` builds the model once on CPU (only when the spec has per-layer rules)
  and rejects a ``layers:`` rule or a ``layers.<name>.w_bits`` search-space key that matches
  none of its quantizable layers, listing them. The matching is the trainer's
  (:func:`qsearch.quant.resolve_precision`): an exact module name, or ``re:<regex>`` as a full
  match; a search-space key may also be a glob (``layers.stage*.w_bits``, matched with
  :func:`fnmatch.fnmatchcase`, as the search-space expansion matches it).
* :func:`check_resources` compares what one trial needs (``resources.cpu``/``gpu``) with what
  each node has. On a fixed cluster a trial no node can hold would wait forever, so it is an
  error naming what is there. With an autoscaler (``QSEARCH_RESOURCE_WAIT_S`` > 0, or
  ``wait_s``) it is a warning, and :func:`check_cluster` waits that long for a node to join
  before it gives up with the same message.

Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qsearch.config import StudySpec
from qsearch.config.catalog import model_info
from qsearch.errors import ConfigError

log = logging.getLogger(__name__)

#: Environment variable: seconds to wait for an autoscaler to add a node that can hold a
#: trial (default 0: no autoscaler, a shortfall is an error at once).
RESOURCE_WAIT_ENV = "QSEARCH_RESOURCE_WAIT_S"

Resources = Mapping[str, float]
Nodes = Resources | Sequence[Resources]


# --------------------------------------------------------------------------- layers


#: A search-space layer key with one of these (and no ``re:``) is a glob over layer names.
GLOB_CHARS = ("*", "?", "[")


def layer_rules(spec: StudySpec) -> list[tuple[str, str]]:
    """``(field, rule key)`` for every per-layer rule: ``base.layers.<key>`` and the search
    space's ``layers.<key>.w_bits`` / ``.a_bits`` keys (module names may contain dots)."""
    rules = [(f"base.layers.{key}", key) for key in (spec.base.get("layers") or {})]
    for path in spec.search_space:
        parts = path.split(".")
        if parts[0] == "layers" and len(parts) >= 3:
            rules.append((f"search_space.{path}", ".".join(parts[1:-1])))
    return rules


def model_layer_names(spec: StudySpec) -> list[str]:
    """The quantizable (conv/linear) layer names of the spec's model, built once on CPU.
    Layer names do not depend on the dataset, so no data is loaded."""
    from qsearch.models import build_model
    from qsearch.quant import quantizable_layers

    cfg = spec.base_config()
    hint = (model_info(cfg.model).input_hint if model_info(cfg.model) else "") or "3"
    in_channels = int(hint.split("x")[0]) if hint.split("x")[0].isdigit() else 3
    try:
        model = build_model(cfg.model, cfg.data.num_classes, in_channels)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder bug must not become a traceback here
        raise ConfigError("model", f"{cfg.model!r} could not be built to check the per-layer "
                          f"rules: {type(e).__name__}: {e}") from e
    return quantizable_layers(model)


def check_layers(spec: StudySpec, layer_names: Sequence[str] | None = None) -> None:
    """Raise ConfigError when a per-layer rule matches no quantizable layer of the model.

    ``layer_names``: the model's layers, if already known (else the model is built, which
    imports torch; nothing is built when the spec has no per-layer rule)."""
    rules = layer_rules(spec)
    if not rules:
        return
    names = list(layer_names) if layer_names is not None else model_layer_names(spec)
    listing = f"the quantizable layers of {spec.model} are: {', '.join(names)}"
    for field, key in rules:
        if key.startswith("re:"):
            try:
                rx = re.compile(key[3:])
            except re.error as e:
                raise ConfigError(field, f"not a valid regular expression: {e}") from None
            if not any(rx.fullmatch(n) for n in names):
                raise ConfigError(field, f"the regex {key[3:]!r} matches no layer (it must "
                                  f"match a whole name); {listing}")
        elif field.startswith("search_space.") and any(c in key for c in GLOB_CHARS):
            if not any(fnmatch.fnmatchcase(n, key) for n in names):
                raise ConfigError(field, f"the pattern {key!r} matches no layer; {listing}")
        elif key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(field, f"no layer {key!r} in {spec.model}; {hint}{listing}")


# --------------------------------------------------------------------------- resources


def needed(spec: StudySpec) -> dict[str, float]:
    """What one trial asks Ray for."""
    return {"CPU": float(spec.resources.cpu), "GPU": float(spec.resources.gpu)}


def _nodes(cluster: Nodes) -> list[Resources]:
    return [cluster] if isinstance(cluster, Mapping) else list(cluster)


def _n(x: float) -> str:
    return f"{x:g}"


def describe(cluster: Nodes) -> str:
    """``1 node: 2 CPU, 0 GPU`` / ``3 nodes: 24 CPU, 2 GPU in all``."""
    nodes = _nodes(cluster)
    cpu = sum(float(n.get("CPU", 0)) for n in nodes)
    gpu = sum(float(n.get("GPU", 0)) for n in nodes)
    if len(nodes) == 1:
        return f"1 node: {_n(cpu)} CPU, {_n(gpu)} GPU"
    return f"{len(nodes)} nodes: {_n(cpu)} CPU, {_n(gpu)} GPU in all"


def check_resources(spec: StudySpec, cluster: Nodes, *, autoscaling: bool = False,
                    where: str = "the cluster") -> str | None:
    """None when some node can run one trial; otherwise the problem as one line.

    ``cluster``: one mapping (a single node, or ``ray.cluster_resources()`` as a stand-in)
    or one mapping per alive node (``[n["Resources"] for n in ray.nodes() if n["Alive"]]``,
    which also catches "enough CPUs in all, but not on one node"). Without ``autoscaling``
    the problem is raised as a ConfigError naming ``resources.cpu`` or ``resources.gpu``;
    with it, it is returned (a warning: the autoscaler may still add a node)."""
    want = needed(spec)
    nodes = _nodes(cluster)
    most = {k: max([float(n.get(k, 0)) for n in nodes] or [0.0]) for k in want}
    have = describe(nodes) if nodes else "no node"
    field, problem = None, None
    if want["GPU"] > 0 and most["GPU"] == 0:
        share = " (a share of one)" if want["GPU"] < 1 else ""
        field, problem = "resources.gpu", (
            f"{_n(want['GPU'])} GPU per trial{share}, but {where} has no GPU ({have}); set "
            "resources.gpu: 0 to train on CPU, or run on GPU nodes")
    elif want["GPU"] > most["GPU"]:
        field, problem = "resources.gpu", (
            f"{_n(want['GPU'])} GPUs per trial, but no node has more than {_n(most['GPU'])} "
            f"({have}); lower resources.gpu to at most {_n(most['GPU'])}")
    elif want["CPU"] > most["CPU"]:
        field, problem = "resources.cpu", (
            f"{_n(want['CPU'])} CPUs per trial, but no node has more than {_n(most['CPU'])} "
            f"({have}); lower resources.cpu to at most {_n(most['CPU'])}"
            + (" or give launch more (--num-cpus)" if where == "this machine" else ""))
    elif not any(all(float(n.get(k, 0)) >= v for k, v in want.items()) for n in nodes):
        field, problem = "resources", (
            f"no single node has both {_n(want['CPU'])} CPUs and {_n(want['GPU'])} GPUs for "
            f"one trial ({have}); lower resources.cpu or resources.gpu")
    if problem is None:
        return None
    if autoscaling:
        return f"{field}: {problem}"
    raise ConfigError(field, problem)


def local_resources(num_cpus: int | None = None, count_gpus: bool = True) -> dict[str, float]:
    """What the private local Ray that ``launch`` starts will have: ``num_cpus`` (default:
    the CPUs this process may use) and the GPUs PyTorch sees (only counted with
    ``count_gpus``, as that imports torch)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    gpus = 0
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if count_gpus and not hidden:  # hidden: Ray and PyTorch see none; skip the torch import
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - no usable CUDA is no GPU
            gpus = 0
    return {"CPU": float(num_cpus if num_cpus is not None else cpus), "GPU": float(gpus)}


def resource_wait_s(explicit: float | None = None) -> float:
    """Seconds to wait for an autoscaler: ``explicit``, else ``QSEARCH_RESOURCE_WAIT_S``,
    else 0 (no autoscaler)."""
    if explicit is not None:
        return max(0.0, float(explicit))
    raw = os.environ.get(RESOURCE_WAIT_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ConfigError(RESOURCE_WAIT_ENV, f"must be a number of seconds (got {raw!r})"
                          ) from None


def _ray_nodes() -> list[Resources]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_cluster(spec: StudySpec, get_nodes: Callable[[], Nodes] | None = None, *,
                  wait_s: float | None = None, poll_s: float = 5.0,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> None:
    """For the driver, after ``init_ray``: make sure some node can run one trial.

    ``get_nodes`` returns the alive nodes' resources (default: from ``ray.nodes()``).
    ``wait_s`` (default ``QSEARCH_RESOURCE_WAIT_S``, 0): with 0 a shortfall raises at once;
    above 0 the cluster is taken to autoscale, the shortfall is logged as a warning, and the
    nodes are polled every ``poll_s`` seconds until one fits or ``wait_s`` have passed, which
    raises a ConfigError saying what was asked, what is there and how long it waited."""
    get_nodes = get_nodes or _ray_nodes
    wait = resource_wait_s(wait_s)
    problem = check_resources(spec, get_nodes(), autoscaling=wait > 0)
    if problem is None:
        return
    log.warning("%s; waiting up to %g s for the autoscaler to add a node (%s)", problem, wait,
                RESOURCE_WAIT_ENV)
    deadline = clock() + wait
    while clock() < deadline:
        sleep(max(0.0, min(poll_s, deadline - clock())))
        problem = check_resources(spec, get_nodes(), autoscaling=True) or None
        if problem is None:
            return
    field, _, text = problem.partition(": ")
    raise ConfigError(field, f"{text}; no node that fits joined within {wait:g} s "
                      f"({RESOURCE_WAIT_ENV})")


# --------------------------------------------------------------------------- launch


def check_launch(spec: StudySpec, *, ray_address: str | None = None,
                 num_cpus: int | None = None, probe: bool = True) -> None:
    """Everything ``qsearch launch`` checks between loading the spec and opening the store,
    cheapest first: the storage URL (no connection), the per-layer rules (builds the model
    only when there are some), the resources of the private local Ray (when no
    ``ray_address`` is given; a cluster is checked by the driver with :func:`check_cluster`),
    and finally, with ``probe``, one read-only connection to a PostgreSQL URL, so a database
    that does not exist is named with the fix instead of retried."""
    from qsearch.config.urls import check_storage_url, probe_database

    check_storage_url(spec.storage)
    check_layers(spec)
    if ray_address is None:
        check_resources(spec, local_resources(num_cpus, count_gpus=spec.resources.gpu > 0),
                        where="this machine")
    if probe:
        probe_database(spec.storage)
