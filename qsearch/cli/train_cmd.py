"""``qsearch train``, ``qsearch models``, ``qsearch datasets``."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qsearch.cli import app, console

#: ``accuracy`` is the per-epoch alias of ``val_accuracy``; ``test_accuracy`` and
#: ``test_loss`` are measured once, on the final weights.
#: Training cost three ways (METHODS.md §7): ``backward_flops`` executed, ``backward_time``
#: (seconds per sample) and ``backward_time_ratio`` measured, ``backward_bops`` modelled
#: (``backward_cost`` is its old name). With LTS on, the dotted keys below also carry
#: ``lts.flops_saved_counted`` and ``lts.flops_saved_executed``.
JSON_KEYS = ("val_accuracy", "accuracy", "test_accuracy", "test_loss", "size_mb", "bops",
             "backward_flops", "backward_time", "backward_time_ratio", "backward_bops",
             "backward_cost", "epochs", "wall_s")
EPOCH_COLUMNS = ("epoch", "train_loss", "val_accuracy", "size_mb", "backward_flops",
                 "backward_bops", "epoch_s")


@app.command()
def train(
    config: Annotated[Optional[str], typer.Argument(help="TrialConfig YAML/JSON file")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override: key=value (dotted keys)")] = [],  # noqa: B006
    checkpoint_dir: Annotated[Optional[str], typer.Option(help="checkpoint every epoch; resume if present")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print final metrics as one JSON line")] = False,
) -> None:
    """Train one trial configuration of the shared QAT trainer."""
    from qsearch.config import load_trial_config
    from qsearch.train import train as run_train

    cfg = load_trial_config(config, set_)
    rows: list[dict] = []
    with Progress(
        TextColumn("[bold]train[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=console, transient=as_json, disable=as_json and not console.is_terminal,
    ) as progress:
        task = progress.add_task(f"{cfg.model}/{cfg.dataset}", total=cfg.epochs, status="")

        def report(m: dict) -> None:
            rows.append(m)
            progress.update(task, completed=m["epoch"],
                            status=f"val acc {m['val_accuracy']:.4f}  "
                                   f"loss {m['train_loss']:.4f}")

        result = run_train(cfg, report=report, checkpoint_dir=checkpoint_dir)

    table = Table(title="per-epoch metrics")
    for col in EPOCH_COLUMNS:
        table.add_column(col, justify="right")
    for m in result.history:
        table.add_row(*(f"{m.get(c):.4g}" if isinstance(m.get(c), float) else str(m.get(c, ""))
                        for c in EPOCH_COLUMNS))
    if not as_json:
        from qsearch.config.objectives import label_of

        console.print(table)
        m = result.metrics
        names = ("val_accuracy", "test_accuracy", "size_mb", "backward_flops", "backward_time",
                 "backward_bops")
        console.print("final: " + "; ".join(
            f"{n} {m[n]:.4g}" + (f" (x{m['backward_time_ratio']:.3f} of an FP32 step)"
                                 if n == "backward_time" and "backward_time_ratio" in m else "")
            + f" — {label_of(n)}" for n in names if isinstance(m.get(n), (int, float))),
            highlight=False, soft_wrap=True)
    else:
        final = {k: result.metrics[k] for k in JSON_KEYS if k in result.metrics}
        final.update({k: v for k, v in result.metrics.items() if "." in k})
        print(json.dumps(final))


@app.command()
def models() -> None:
    """List the model registry."""
    from qsearch.models import list_models, model_entry

    table = Table(title="models")
    for c in ("name", "input", "description"):
        table.add_column(c)
    for name in list_models():
        e = model_entry(name)
        table.add_row(name, e.input_hint, e.description)
    console.print(table)


@app.command()
def datasets() -> None:
    """List the dataset registry."""
    from qsearch.data import dataset_entry, list_datasets

    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("description")
    table.add_column("validation split")
    for name in list_datasets():
        entry = dataset_entry(name)
        table.add_row(name, entry.description, entry.validation)
    console.print(table)
