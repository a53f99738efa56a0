"""``qsearch launch | studies | status | pareto | export | eval``: the search service CLI.

Commands that read a study take ``--storage URL`` (default: ``$QSEARCH_STORAGE`` or the
SQLite file ``qsearch.db`` in the working directory). Every user error is a QsearchError,
which :func:`qsearch.cli.main` prints as one line with exit code 2.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from qsearch.cli import app, console
from qsearch.errors import ConfigError
from qsearch.search.display import format_value

StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage", help="database URL (default $QSEARCH_STORAGE or sqlite:///qsearch.db)")]


def _store(url: str | None, create: bool = False) -> Any:
    from qsearch.config import DEFAULT_STORAGE
    from qsearch.config.urls import check_storage_url, probe_database
    from qsearch.store import Store

    url = url or os.environ.get("QSEARCH_STORAGE") or DEFAULT_STORAGE
    check_storage_url(url, "--storage", create=create)  # postgres://, no driver: the fix
    probe_database(url, "--storage")  # a database that does not exist: not retried
    # One-shot commands: a wrong or unreachable URL should fail fast, not after back-offs.
    return Store(url, create=create, retries=1)


def _table(title: str, columns: tuple[str, ...], wrap: tuple[str, ...] = ()) -> Table:
    """A compact table whose short columns never wrap or truncate (an 80-column pipe would
    otherwise cut ``COMPLETE`` to ``COMPLE…``); only the ``wrap`` columns give way."""
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c in columns:
        t.add_column(c, no_wrap=c not in wrap, overflow="fold", min_width=min(len(c), 8))
    return t


@app.command()
def launch(
    spec: Annotated[str, typer.Argument(help="study spec YAML")],
    storage: StorageOpt = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a private local Ray)")] = None,
    name: Annotated[Optional[str], typer.Option(help="study name (overrides the spec)")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(
        min=1, help="CPUs for the local Ray (default: all)")] = None,
    quiet: Annotated[bool, typer.Option(help="no live table; print one summary line")] = False,
    verbose: Annotated[bool, typer.Option(
        help="library logs (Optuna, Ray, Tune) on the terminal instead of the study's "
             "driver.log")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="validate the spec, print the expanded search space, objectives "
        "and constraints (as `qsearch space`), write nothing and run nothing")] = False,
) -> None:
    """Run or resume a study until its trial budget is used up."""
    # The spec is checked in full before anything is written (no database, no folder): its
    # fields, the storage URL, the per-layer rules against the model's layers, and what a
    # trial asks for against this machine (a cluster's resources: once Ray is up).
    from qsearch.config import load_study_spec
    from qsearch.search import launch as run_launch
    from qsearch.search.preflight import check_launch

    study = load_study_spec(spec, storage=storage or os.environ.get("QSEARCH_STORAGE"), name=name)
    check_launch(study, ray_address=ray_address, num_cpus=num_cpus)
    if dry_run:
        from qsearch.cli.study_cmd import space

        space(spec)
        return
    from qsearch.search.driver import artifacts_dir
    from qsearch.search.logs import route_logs

    log_file = route_logs(artifacts_dir(study) / study.name / "driver.log", verbose=verbose)
    r = run_launch(study, ray_address=ray_address, num_cpus=num_cpus, display=not quiet,
                   console=console)
    if log_file is not None:
        console.print(f"library logs: {log_file}", highlight=False, style="dim")
    console.print(f"study {r.study}: {r.status}; {r.counted} trials counted "
                  f"({r.complete} complete, {r.pruned} pruned, {r.failed} failed, "
                  f"{r.lost} lost) in {r.wall_s:.1f} s", highlight=False, soft_wrap=True)
    if r.status == "interrupted":
        again = f"qsearch launch {spec}" + (f" --name {name}" if name else "") + \
            (f" --storage {storage}" if storage else "")
        console.print(f"interrupted trials are not counted; resume with: {again}",
                      highlight=False)
        raise typer.Exit(130)


def _reader(url: str | None) -> Any:
    """A read-only handle for the commands that only read (no writes, no schema creation; a
    missing SQLite file is an error); one retry, so a wrong URL fails fast."""
    from qsearch.config import defaults
    from qsearch.config.urls import check_storage_url, probe_database
    from qsearch.store import Database

    url = defaults.storage_url(url)
    check_storage_url(url, "--storage", create=False)  # postgres://, no driver: the fix
    probe_database(url, "--storage")  # a database that does not exist: not retried
    return Database(url, retries=1, must_exist=True)


def _legend(infos: list[Any]) -> str:
    """``accuracy ↑ accuracy (top-1, measured); ...``: the registry's words for the columns."""
    return "; ".join(f"{i.name} {i.arrow} {i.axis_title}".replace("  ", " ")
                     for i in infos if i.registered)


@app.command()
def studies(storage: StorageOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the studies in a database."""
    from qsearch.store import objective_info, queries

    db = _reader(storage)
    rows = queries.list_studies(db) if db.has_schema() else []
    if as_json:
        print(json.dumps([{**r.to_dict(), "objective_info": [
            objective_info(o, d).to_dict() for o, d in zip(r.objectives, r.directions)]}
            for r in rows], default=str, indent=2))
        return
    running = any(r.lease_host for r in rows)  # the driver column only while one runs
    t = _table(f"studies in {db.masked_url}",
               ("name", "status", "trials", "done/pruned/fail/run",
                *(("driver",) if running else ()), "created"), wrap=("driver",))
    for r in rows:  # objectives: see --json (names, labels, units, directions)
        c = r.trials
        driver = f"{r.lease_host}:{r.lease_pid}" if r.lease_host else ""
        t.add_row(r.name, r.status, str(r.n_trials),
                  "/".join(str(c[s]) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")),
                  *((driver,) if running else ()), str(r.created_at)[:16])
    console.print(t)


@app.command()
def status(study: Annotated[str, typer.Argument(help="study name")], storage: StorageOpt = None) -> None:
    """Trials of one study with their state and objective values."""
    from qsearch.store import queries

    db = _reader(storage)
    rec = queries.require_study(db, study)
    snap, front = queries.pareto_front(db, study)
    on_front = {p.trial_number for p in front}
    rows = queries.trials(db, study)
    # The objectives only: an 80-column pipe has no room for more (``qsearch pareto
    # --format json|csv`` and the dashboard show the values trials report besides).
    infos = rec.objective_infos()
    retried = any(r.retries for r in rows)  # the column only when it says something
    t = _table(f"study {study} ({rec.status}); * = on the Pareto front",
               ("#", "state", "epochs", *(("retries",) if retried else ()),
                *(f"{i.name}{i.arrow}" for i in infos), "*", "detail / params"),
               wrap=("detail / params",))
    for r in rows:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in (r.params or {}).items())
        t.add_row(str(r.number), r.state, f"{r.epochs_completed}/{r.max_epochs or ''}",
                  *((str(r.retries),) if retried else ()),
                  *(format_value(r.value(i.name)) for i in infos),
                  "*" if r.number in on_front else "",
                  (r.error or (r.detail + "; " if r.detail else "") + params)[:160])
    console.print(t)
    console.print(_legend(infos), highlight=False, soft_wrap=True)
    if snap:
        console.print(f"Pareto front: {len(front)} trials, hypervolume "
                      f"{format_value(snap.hypervolume)} "
                      f"(reference {snap.reference_point})", highlight=False)


@app.command()
def pareto(
    study: Annotated[str, typer.Argument(help="study name")],
    storage: StorageOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv")] = "table",
    snapshot: Annotated[Optional[int], typer.Option(help="snapshot number (default: latest)")] = None,
    objectives: Annotated[Optional[str], typer.Option("--objectives", help=(
        "re-draw the front on these objectives from the stored values, comma-separated "
        "(e.g. val_accuracy,size_mb,backward_time); nothing is re-run or written"))] = None,
) -> None:
    """The study's stored Pareto front: objective values (names, labels, units and
    directions from the objective registry), the values the trials report without
    optimizing, and each trial's searched params. With --objectives, the front of the
    stored values on other objectives (e.g. another of the three training costs)."""
    from qsearch.store import objective_info, queries

    if fmt not in ("table", "json", "csv"):
        raise ConfigError("--format", f"unknown format {fmt!r}; choose table, json or csv")
    db = _reader(storage)
    rec = queries.require_study(db, study)
    if objectives is not None:
        if snapshot is not None:
            raise ConfigError("--objectives", "re-draws the current front; drop --snapshot")
        snap, points = None, _redrawn_front(db, rec, objectives)
        objs = [n.strip() for n in objectives.split(",")]
    else:
        snap, points = queries.pareto_front(db, study, snapshot)
        objs = list(rec.objectives)
    infos = [objective_info(o, d) for o, d in zip(objs, rec.directions)] \
        if objectives is None else [objective_info(o) for o in objs]
    reported = queries.order_names(k for p in points for k in p.reported)
    if "val_accuracy" in objs or "val_accuracy" in reported:
        reported = [k for k in reported if k != "accuracy"]  # newer trials: its alias
    if fmt == "json":
        print(json.dumps({
            "study": study, "snapshot": snap and snap.snapshot,
            "front": "stored" if objectives is None else "recomputed",
            "hypervolume": snap and snap.hypervolume,
            "reference_point": snap and snap.reference_point,
            "objectives": [i.to_dict() for i in infos],
            "reported": [objective_info(k).to_dict() for k in reported],
            "points": [{"trial_number": p.trial_number, **{o: p.value(o) for o in objs},
                        "is_knee": p.is_knee, "params": p.params, "reported": p.reported}
                       for p in points]}, indent=2, default=str))
    elif fmt == "csv":
        # objectives and is_knee first, as before reported values and params were added
        cols = ["trial_number", *objs, "is_knee", *reported, "params"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for p in points:
            w.writerow({"trial_number": p.trial_number, **{o: p.value(o) for o in objs},
                        **{k: p.reported.get(k) for k in reported}, "is_knee": p.is_knee,
                        "params": json.dumps(p.params, sort_keys=True, default=str)})
        print(buf.getvalue(), end="")
    else:
        title = f"Pareto front of {study}" + (
            f" (snapshot {snap.snapshot}, hypervolume {format_value(snap.hypervolume)})"
            if snap else f" re-drawn on {', '.join(objs)} from stored values (not stored)"
            if objectives is not None else "")
        more = [objective_info(k) for k in reported]
        t = _front_table(title, points, infos, more)
        out = console
        if _table_width(t) > console.width:
            if console.is_terminal:
                # Squeezed, every number would end in an ellipsis: keep the optimized
                # objectives whole and say where the other columns are.
                t = _front_table(title, points, infos, [])
                console.print(t)
                console.print(f"{len(more)} more reported values per point "
                              f"({', '.join(i.name for i in more)}): widen the terminal or "
                              "use --format json|csv", highlight=False, soft_wrap=True)
                more = []
                t = None
            else:  # a pipe or file: no terminal to fit, print every column whole
                out = Console(width=_table_width(t), highlight=False)
        if t is not None:
            out.print(t)
        console.print(_legend(infos + more), highlight=False, soft_wrap=True)


def _front_table(title: str, points: list[Any], infos: list[Any], more: list[Any]) -> Table:
    t = Table(title=title)
    t.add_column("trial", justify="right", no_wrap=True)
    for i in infos + more:  # names as headers; the legend below gives labels and units
        t.add_column(f"{i.name}{i.arrow}", justify="right", no_wrap=True)
    t.add_column("knee", no_wrap=True)
    for p in points:
        t.add_row(str(p.trial_number), *(format_value(p.value(i.name)) for i in infos),
                  *(format_value(p.reported.get(i.name)) for i in more),
                  "knee" if p.is_knee else "")
    return t


def _table_width(t: Table) -> int:
    """The width ``t`` needs to show every cell whole."""
    return Measurement.get(console, console.options.update(width=10_000), t).maximum


def _redrawn_front(db: Any, rec: Any, names_csv: str) -> list[Any]:
    """The front of the study's stored values on ``names_csv`` (the driver's candidates:
    COMPLETE, feasible, one trial per config), as front points; computed, not stored."""
    from qsearch.config.objectives import objective_names
    from qsearch.search.front import compute_front
    from qsearch.store import objective_info, queries

    names = [n.strip() for n in names_csv.split(",")]
    infos = [objective_info(n) for n in names]
    bad = [i.name for i in infos if not i.registered or not i.optimizable]
    if bad or len(names) < 2 or len(set(names)) < len(names):
        raise ConfigError("--objectives", (
            f"unknown or not selectable objective {', '.join(repr(b) for b in bad)}"
            if bad else "give two or more different objectives")
            + "; choose from " + ", ".join(
                n for n in objective_names() if objective_info(n).optimizable))
    rows = queries.complete_values(db, rec.id)
    front = compute_front(rows, names, [i.direction for i in infos])["points"]
    stored = {r.number: r for r in queries.trials(db, rec.name, ["COMPLETE"])}
    out = []
    for p in front:
        t = stored[p["trial_number"]]
        reported = {k: x for k, x in t.values.items() if k not in p["values"]
                    and queries.value_of(p["values"], k) is None}
        out.append(queries.FrontPoint(p["trial_number"], p["is_knee"], dict(p["values"]),
                                      dict(t.params or {}), reported))
    return out


@app.command()
def export(
    study: Annotated[str, typer.Argument(help="study name")],
    output: Annotated[str, typer.Option("--output", "-o", help=(
        "export file (.json, .yaml or .onnx); with --all-front, a directory"))],
    storage: StorageOpt = None,
    trial: Annotated[Optional[int], typer.Option(help="export this trial number")] = None,
    rule: Annotated[Optional[str], typer.Option(
        "--pick", "--rule", help="max-accuracy | min-size | knee (default)")] = None,
    max_size_mb: Annotated[Optional[float], typer.Option(help="only Pareto trials at most this size")] = None,
    min_accuracy: Annotated[Optional[float], typer.Option(help="only Pareto trials at least this accurate")] = None,
    max_backward_cost: Annotated[Optional[float], typer.Option(help="only Pareto trials at most this backward cost")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help=(
        "json | yaml | onnx (default: from the -o suffix; onnx with --all-front). onnx also "
        "writes <name>.encodings.json and the JSON export beside the model"))] = None,
    all_front: Annotated[bool, typer.Option("--all-front", help=(
        "export every point of the stored Pareto front into the -o directory, with an "
        "index.json"))] = False,
    act_types: Annotated[str, typer.Option(help=(
        "ONNX activation Q/DQ types: int8 (runs in every ONNX Runtime mode) or int4 "
        "(INT4/UINT4 for grids of <= 4 bits)"))] = "int8",
) -> None:
    """Export a trial's config, per-layer precision and weights (and ONNX for deployment)."""
    from pathlib import Path

    from qsearch.export import export_trial, rebuild_model, select_trial
    from qsearch.store import queries

    if fmt is not None and fmt not in ("json", "yaml", "onnx"):
        raise ConfigError("--format", f"unknown format {fmt!r}; choose json, yaml or onnx")
    if act_types not in ("int8", "int4"):
        raise ConfigError("--act-types", f"choose int8 or int4, not {act_types!r}")
    if trial is not None and rule is not None:
        raise ConfigError("--trial", "give either --trial or --pick, not both")
    if all_front and (trial is not None or rule is not None):
        raise ConfigError("--all-front", "exports the whole front; drop --trial/--pick")

    def deploy(store: Any, number: int, onnx_path: Path, doc_path: Path) -> dict[str, Any]:
        from qsearch.deploy.bundle import write_deploy_files

        doc = export_trial(store, study, number, doc_path)
        model, cfg, data = rebuild_model(doc, doc_path)
        files = write_deploy_files(model, cfg, data, onnx_path, study=study, trial=number,
                                   objectives=doc["objectives"], act_types=act_types)
        return {"doc": doc, **files}

    store = _store(storage)
    if all_front:
        from qsearch.deploy.size import format_size_report

        out_dir = Path(output)
        if out_dir.suffix.lower() in (".json", ".yaml", ".yml", ".onnx"):
            raise ConfigError("--output", "with --all-front, -o names a directory")
        queries.require_study(store, study)
        _, points = queries.pareto_front(store, study)
        if not points:
            raise ConfigError("study", f"study {study!r} has no Pareto front yet")
        fmt = fmt or "onnx"
        ext = ".yaml" if fmt == "yaml" else ".json"
        out_dir.mkdir(parents=True, exist_ok=True)
        index: list[dict[str, Any]] = []
        for p in points:
            n = int(p["trial_number"])
            stem = out_dir / f"trial-{n:04d}"
            entry: dict[str, Any] = {"trial": n, "is_knee": bool(p.get("is_knee"))}
            if fmt == "onnx":
                r = deploy(store, n, stem.with_suffix(".onnx"), stem.with_suffix(ext))
                doc = r["doc"]
                entry.update(onnx=r["onnx"], encodings=r["encodings"],
                             onnx_bytes=r["size"]["file_bytes"],
                             weights_bytes_by_dtype=r["size"]["weights_bytes_by_dtype"])
                console.print(format_size_report(r["size"]), highlight=False, soft_wrap=True)
            else:
                doc = export_trial(store, study, n, stem.with_suffix(ext))
            entry.update(export=stem.with_suffix(ext).name, weights=doc["weights"]["file"],
                         objectives=doc["objectives"])
            index.append(entry)
        (out_dir / "index.json").write_text(json.dumps(
            {"format": "qsearch-export-index", "version": 1, "study": study,
             "points": index}, indent=2))
        console.print(f"exported {len(index)} Pareto trials of {study} to {out_dir} "
                      f"(index.json)", highlight=False)
        return
    out = Path(output)
    fmt = fmt or ("onnx" if out.suffix.lower() == ".onnx" else
                  "yaml" if out.suffix.lower() in (".yaml", ".yml") else "json")
    if (fmt == "onnx") != (out.suffix.lower() == ".onnx") or \
            (fmt == "yaml") != (out.suffix.lower() in (".yaml", ".yml")):
        want = {"onnx": ".onnx", "yaml": ".yaml or .yml", "json": ".json"}[fmt]
        raise ConfigError("--output", f"a --format {fmt} export must end in {want}")
    number = select_trial(store, study, trial=trial, rule=rule, max_size_mb=max_size_mb,
                          min_accuracy=min_accuracy, max_backward_cost=max_backward_cost)
    if fmt == "onnx":
        from qsearch.deploy.size import format_size_report

        r = deploy(store, number, out, out.with_suffix(".json"))
        doc = r["doc"]
        written = f"{out} (+ {r['encodings']}, {out.with_suffix('.json').name}, " \
                  f"{doc['weights']['file']})"
    else:
        doc = export_trial(store, study, number, out)
        written = f"{output} (+ {doc['weights']['file']})"
    from qsearch.config.objectives import get_objective

    o = doc["objectives"]
    shown = []
    for name in [n for n in o if n != "accuracy"] if "val_accuracy" in o else list(o):
        v = o.get(name)
        if not isinstance(v, (int, float)):
            continue
        try:
            unit = get_objective(name).unit
        except KeyError:
            unit = ""
        shown.append(f"{name} {v:.4g}{' ' + unit if unit else ''}")
    console.print(f"exported trial {number} of {study} to {written}: {', '.join(shown)}",
                  highlight=False, soft_wrap=True)
    if fmt == "onnx":
        console.print(format_size_report(r["size"]), highlight=False, soft_wrap=True)


@app.command(name="eval")
def eval_(
    export_file: Annotated[str, typer.Argument(
        help="export JSON/YAML written by qsearch export, or an exported .onnx model")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    dataset: Annotated[Optional[str], typer.Option(help=(
        ".onnx only: score on this dataset instead of the one in the model's metadata"))] = None,
) -> None:
    """Rebuild an exported model, re-measure accuracy and size, compare with the study; an
    .onnx model runs in ONNX Runtime (CPU) on its dataset's test split."""
    from qsearch.errors import CheckpointError

    if export_file.lower().endswith(".onnx"):
        from qsearch.deploy.onnx_eval import evaluate_onnx

        r = evaluate_onnx(export_file, dataset=dataset)
        if as_json:
            print(json.dumps(r))
            return
        where = f" of study {r['study']}, trial {r['trial']}" if r.get("study") else ""
        stored = "; ".join(f"stored {k} {r[key]:.6f}" for k, key in (
            ("accuracy", "stored_accuracy"), ("test accuracy", "stored_test_accuracy"))
            if r.get(key) is not None) or "no stored accuracy in the model's metadata"
        diff = f"; difference {r['difference']:+.6f}" if r["difference"] is not None else ""
        console.print(f"accuracy {r['accuracy']:.6f} on the {r['dataset']} test split "
                      f"({r['n']} images, ONNX Runtime CPU){where}: {stored}{diff}",
                      highlight=False, soft_wrap=True)
        return
    if dataset is not None:
        raise ConfigError("--dataset", "only applies to .onnx models")
    from qsearch.export import evaluate_export

    r = evaluate_export(export_file)
    if as_json:
        print(json.dumps(r))
    else:
        console.print(f"accuracy {r['accuracy']:.6f} (stored {r['stored_accuracy']:.6f}), "
                      f"size {r['size_mb']:.6g} MB (stored {r['stored_size_mb']:.6g}): "
                      f"{'match' if r['match'] else 'MISMATCH'}", highlight=False)
    if not r["match"]:
        raise CheckpointError("re-measured accuracy/size differ from the stored values")
