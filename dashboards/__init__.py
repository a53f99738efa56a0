"""qsearch's Pareto dashboards: a read-only Dash/Plotly app over the study store, and a
self-contained HTML report.

``qsearch dashboard`` runs :func:`serve`; ``qsearch report`` runs :func:`write_report`. Heavy
imports (dash, optuna) happen inside the functions so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve", "write_report"]


def create_app(storage: Any = None) -> Any:
    """See :func:`dashboards.app.create_app`."""
    from dashboards.app import create_app as _create

    return _create(storage)


def serve(storage: str | None = None, host: str = "127.0.0.1", port: int = 8050) -> None:
    """See :func:`dashboards.app.serve`."""
    from dashboards.app import serve as _serve

    _serve(storage, host, port)


def write_report(study: str, out: Any, storage: str | None = None) -> Any:
    """See :func:`dashboards.report.write_report`."""
    from dashboards.report import write_report as _write

    return _write(study, out, storage)
