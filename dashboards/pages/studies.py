"""The study list: status, trial counts per state, best values and hypervolume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dash import Dash, Input, Output, dcc, html

from dashboards import components as c
from dashboards import data
from dashboards.readonly import Source

REFRESH_MS = 5000
COLUMNS = ["study", "status", "objectives", "finished", "running", "pruned", "failed",
           "best values", "hypervolume", "created"]


def _best(s: data.StudySummary) -> str:
    """``accuracy 0.91 · size 0.05 MB``: the best stored value of each objective, labelled
    and with units from the objective registry."""
    return " · ".join(f"{o.label} {c.fmt(s.best.get(o.name))}{' ' + o.unit if o.unit else ''}"
                      for o in s.objectives if s.best.get(o.name) is not None) or "–"


def _content(src: Source) -> tuple[Any, bool]:
    studies = data.list_studies(src)
    rows = []
    for s in studies:
        n = s.counts
        rows.append([
            dcc.Link(s.name, href=c.study_href(s.name), className="study-link"),
            c.badge(s.status), ", ".join(f"{o.name} {o.arrow}" for o in s.objectives),
            n.get("COMPLETE", 0), n.get("RUNNING", 0), n.get("PRUNED", 0), n.get("FAIL", 0),
            _best(s), s.hypervolume, c.fmt(s.created_at)])
    parts: list[Any] = []
    if rows:
        parts.append(c.table(COLUMNS, rows, table_id="studies-table",
                             numeric=(3, 4, 5, 6, 8)))
    else:
        parts.append(html.P(["No qsearch study in this database yet. Start one with ",
                             html.Code("qsearch launch studies/<spec>.yaml"), "."],
                            className="muted", id="studies-table"))
    others = data.optuna_only_studies(src, {s.name for s in studies})
    if others:
        parts.append(html.P([
            "Optuna studies not launched by qsearch (open them with ",
            html.Code(f"optuna-dashboard {src.masked_url}"), "): ",
            ", ".join(f"{o['name']} ({o['n_trials']} trials)" for o in others)],
            className="muted small"))
    return parts, any(s.status == "running" for s in studies)


def layout(src: Source) -> html.Div:
    content, running = _content(src)
    return html.Div([
        html.Div([html.H2("Studies"), html.Span(src.masked_url, className="muted mono")],
                 className="page-title"),
        c.card(None, html.Div(content, id="studies-content")),
        html.Div(c.live_note(running, REFRESH_MS), id="studies-live"),
        dcc.Interval(id="studies-refresh", interval=REFRESH_MS, disabled=not running),
    ], className="page")


def register(app: Dash, source: Callable[[], Source]) -> None:
    @app.callback(Output("studies-content", "children"), Output("studies-live", "children"),
                  Output("studies-refresh", "disabled"),
                  Input("studies-refresh", "n_intervals"), prevent_initial_call=True)
    def refresh(_n: int | None) -> tuple[Any, Any, bool]:
        content, running = _content(source())
        return content, c.live_note(running, REFRESH_MS), not running
