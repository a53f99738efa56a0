"""``qsearch dashboard`` and ``qsearch report``: the read-only views of a study database.

Both default to the same storage as the other commands (``$QSEARCH_STORAGE`` or
``sqlite:///qsearch.db``). The dashboard binds 127.0.0.1 unless ``--host`` says otherwise;
a wider bind is logged as a warning because the app has no authentication.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from qsearch.cli import app, console

StorageOpt = Annotated[str | None, typer.Option(
    "--storage", help="database URL (default $QSEARCH_STORAGE or sqlite:///qsearch.db)")]


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="interface to bind; anything but 127.0.0.1/localhost "
                                           "exposes the unauthenticated dashboard")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8050,
) -> None:
    """Serve the Pareto dashboards (read-only) for a study database."""
    from dashboards import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    serve(storage, host=host, port=port)


@app.command()
def report(
    study: Annotated[str, typer.Argument(help="study name")],
    output: Annotated[str, typer.Option("-o", "--output", help="HTML file to write")] = "report.html",
    storage: StorageOpt = None,
) -> None:
    """Write one self-contained HTML report (Pareto, hypervolume, parallel coordinates,
    Pareto table); opens without network access."""
    from dashboards import write_report

    path = write_report(study, output, storage)
    console.print(f"report of study {study} written to {path} "
                  f"({path.stat().st_size / 1e6:.1f} MB, self-contained)", highlight=False)
