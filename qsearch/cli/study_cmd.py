"""``qsearch space | importance``: what a spec searches, and which parameters mattered.

``qsearch space SPEC`` validates a study spec, expands its per-layer patterns
(``layers.*.w_bits`` -> one dimension per layer) and prints the resulting search space, the
objectives and the constraints. It writes nothing (``--sensitivity`` also computes the
per-layer sensitivity, which trains and caches the FP32 warm start if it is not cached).

``qsearch importance STUDY`` ranks the searched parameters per objective with Optuna's
importance evaluators over the study's complete trials.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from qsearch.cli import app, console
from qsearch.errors import ConfigError


class Fmt(str, Enum):
    table = "table"
    json = "json"


class Evaluator(str, Enum):
    ped_anova = "ped-anova"
    fanova = "fanova"
    mdi = "mdi"


def describe_dist(dist: Any) -> str:
    """``int 2..8``, ``categorical [2, 4, 8]``, ``float 0.002..0.05 log``, ``fixed 4``."""
    d = dist.model_dump()
    t = d["type"]
    if t == "categorical":
        return f"categorical {json.dumps(d['choices'])}"
    if t == "fixed":
        return f"fixed {json.dumps(d['value'], default=str)}"
    extra = []
    if d.get("log"):
        extra.append("log")
    step = d.get("step")
    if step not in (None, 1) or (t == "float" and step is not None):
        extra.append(f"step {step:g}")
    return f"{t} {d['low']:g}..{d['high']:g}" + (f" ({', '.join(extra)})" if extra else "")


def _objective_rows(spec: Any) -> list[dict[str, Any]]:
    from qsearch.config.objectives import get_objective

    rows = []
    for name in spec.objectives:
        o = get_objective(name)
        rows.append({"name": name, "direction": o.direction, "unit": o.unit, "kind": o.kind,
                     "label": o.label})
    return rows


def _constraint_rows(spec: Any) -> list[dict[str, Any]]:
    out = []
    for name, bound in (getattr(spec, "constraints", None) or {}).items():
        b = bound.model_dump() if hasattr(bound, "model_dump") else dict(bound)
        out.append({"objective": name, **{k: v for k, v in b.items() if v is not None}})
    return out


@app.command()
def space(
    spec: Annotated[str, typer.Argument(help="study spec YAML")],
    sensitivity: Annotated[bool, typer.Option(
        "--sensitivity", help="also print each layer's Hessian sensitivity (trains and caches "
        "the FP32 warm start if needed) and the seeds sampler.sensitivity would enqueue")] = False,
    fmt: Annotated[Fmt, typer.Option("--format", help="table or json")] = Fmt.table,
) -> None:
    """Validate SPEC, expand its per-layer patterns and print the search space, objectives and
    constraints (writes nothing)."""
    from qsearch.config import load_study_spec
    from qsearch.search.expand import describe_expansion, expand_search_space

    study = load_study_spec(spec)
    expanded = expand_search_space(study)
    origin = {t: p for p, ts in describe_expansion(study, expanded).items() for t in ts}
    dims = [{"path": p, "distribution": describe_dist(d), "searched": d.type != "fixed",
             **({"from": origin[p]} if p in origin else {})}
            for p, d in expanded.search_space.items()]
    doc: dict[str, Any] = {"study": study.name, "model": study.model, "dataset": study.dataset,
                           "dimensions": dims, "objectives": _objective_rows(study),
                           "constraints": _constraint_rows(study)}
    if sensitivity:
        doc.update(_sensitivity_doc(expanded))
    if fmt == Fmt.json:
        print(json.dumps(doc, indent=2, default=str))
        return
    n = sum(d["searched"] for d in dims)
    console.print(f"search space of {study.name} ({study.model} on {study.dataset}): "
                  f"{n} searched dimension{'s' if n != 1 else ''}, "
                  f"{len(dims) - n} fixed", highlight=False, soft_wrap=True)
    for d in dims:
        src = f"   (from {d['from']})" if "from" in d else ""
        console.print(f"  {d['path']}: {d['distribution']}{src}", highlight=False,
                      soft_wrap=True)
    console.print("objectives:", highlight=False)
    for o in doc["objectives"]:
        unit = f", {o['unit']}" if o["unit"] else ""
        console.print(f"  {o['name']}: {o['direction']} ({o['label']}{unit}, {o['kind']})",
                      highlight=False)
    if doc["constraints"]:
        console.print("constraints:", highlight=False)
        for c in doc["constraints"]:
            parts = [f"{k} {c[k]:g}" for k in ("min", "max") if k in c]
            console.print(f"  {c['objective']}: {', '.join(parts)}", highlight=False)
    if sensitivity:
        sd = doc["sensitivity"]
        console.print(f"per-layer sensitivity: max(tr H, 0) * mean(W^2), tr H by Hutchinson "
                      f"({sd['probes']} Rademacher probes x {sd['batches']} batches) on the "
                      f"{'warm-started' if sd['warm_start'] else 'initial'} model; cached in "
                      f"{sd['cache']}", highlight=False, soft_wrap=True)
        t = Table(box=box.SIMPLE_HEAD)
        for c in ("layer", "params", "tr(H)", "± se", "sensitivity"):
            t.add_column(c, no_wrap=True)
        for r in doc["sensitivity"]["layers"]:
            t.add_row(r["layer"], str(r["n_params"]), f"{r['trace']:.4g}",
                      f"{r['trace_std']:.2g}", f"{r['sensitivity']:.4g}")
        console.print(t)
        if doc.get("seeds"):
            console.print("seeds (sampler.sensitivity):", highlight=False)
            for s in doc["seeds"]:
                console.print("  " + ", ".join(f"{k}={v}" for k, v in s.items()),
                              highlight=False, soft_wrap=True)


def _sensitivity_doc(expanded: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from qsearch.search.sensitivity import seed_configs, seeded_dimensions, sensitivity_profile

    prof = sensitivity_profile(expanded.base_config())
    out: dict[str, Any] = {"sensitivity": {
        "estimator": "hutchinson", "probes": prof.probes, "batches": prof.batches,
        "warm_start": prof.warm_start, "cache": str(prof.path),
        "layers": [asdict(v) for v in prof.layers.values()]}}
    if seeded_dimensions(expanded):
        n = getattr(expanded.sampler, "sensitivity_seeds", 4)
        out["seeds"] = seed_configs(expanded, prof.as_dict(), n)
    return out


@app.command()
def importance(
    study: Annotated[str, typer.Argument(help="study name")],
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="database URL (default $QSEARCH_STORAGE or sqlite:///qsearch.db)")] = None,
    objective: Annotated[Optional[list[str]], typer.Option(
        "--objective", help="only this objective (repeatable; default: all)")] = None,
    evaluator: Annotated[Evaluator, typer.Option(
        "--evaluator", help="Optuna importance evaluator")] = Evaluator.ped_anova,
    fmt: Annotated[Fmt, typer.Option("--format", help="table or json")] = Fmt.table,
) -> None:
    """Importance of each searched parameter per objective (Optuna's evaluators over the
    complete trials; normalised to 1 per objective)."""
    from qsearch.config import defaults
    from qsearch.config.urls import check_storage_url, probe_database, sqlite_path
    from qsearch.search.importance import study_importances

    url = defaults.storage_url(storage)
    check_storage_url(url, "--storage", create=False)
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
        if path is None or not path.is_file():
            raise ConfigError("--storage", f"no database file {path}; run qsearch launch "
                              "first or pass --storage")
    probe_database(url, "--storage")
    results = study_importances(study, url, objective or None, evaluator.value)
    if fmt == Fmt.json:
        print(json.dumps({"study": study, "evaluator": evaluator.value,
                          "objectives": [r.to_dict() for r in results]}, indent=2))
        return
    params = list(dict.fromkeys(p for r in results for p in r.importances))
    # rows in the order of the first objective's ranking
    t = Table(title=f"parameter importance in {study} ({evaluator.value}, "
                    f"{results[0].n_trials} complete trials)", box=box.SIMPLE_HEAD)
    t.add_column("parameter", no_wrap=True)
    for r in results:
        t.add_column(f"{r.objective} {'↑' if r.direction == 'maximize' else '↓'}",
                     justify="right", no_wrap=True)
    for p in params:
        t.add_row(p, *(f"{r.importances.get(p, 0.0):.3f}" for r in results))
    console.print(t)
