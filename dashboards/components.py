"""Small HTML building blocks shared by the pages (and their look, via assets/style.css)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from dash import dcc, html

GRAPH_CONFIG = {"displaylogo": False,
                "toImageButtonOptions": {"format": "png", "scale": 2}}


def study_href(name: str) -> str:
    return f"/study/{quote(name, safe='')}"


def trial_href(name: str, number: int) -> str:
    return f"{study_href(name)}/trial/{int(number)}"


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def badge(status: str) -> html.Span:
    return html.Span(status, className=f"badge badge-{status.lower()}")


def stat(label: str, value: Any, extra: str = "") -> html.Div:
    return html.Div([html.Div(label, className="stat-label"),
                     html.Div(fmt(value) if not isinstance(value, (str, list)) else value,
                              className="stat-value")], className=f"stat {extra}".strip())


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str | None = None,
          numeric: Sequence[int] = ()) -> html.Table:
    """A plain HTML table (cells may be components, e.g. links)."""
    head = html.Thead(html.Tr([html.Th(c, className="num" if i in numeric else None)
                               for i, c in enumerate(columns)]))
    body = html.Tbody([html.Tr([html.Td(c if not isinstance(c, (float, int)) or isinstance(c, bool)
                                        else fmt(c), className="num" if i in numeric else None)
                                for i, c in enumerate(r)]) for r in rows])
    kw = {"id": table_id} if table_id else {}
    return html.Table([head, body], className="data-table", **kw)


def card(title: str | None, *children: Any, class_name: str = "") -> html.Div:
    parts = [html.H3(title, className="card-title")] if title else []
    return html.Div(parts + list(children), className=f"card {class_name}".strip())


def graph(graph_id: str, figure: Any) -> dcc.Graph:
    return dcc.Graph(id=graph_id, figure=figure, config=GRAPH_CONFIG, className="graph")


def breadcrumbs(*items: tuple[str, str | None]) -> html.Nav:
    out: list[Any] = []
    for i, (label, href) in enumerate(items):
        if i:
            out.append(html.Span("/", className="crumb-sep"))
        out.append(dcc.Link(label, href=href) if href else html.Span(label))
    return html.Nav(out, className="crumbs")


def message_page(title: str, text: str) -> html.Div:
    return html.Div([breadcrumbs(("Studies", "/")),
                     card(title, html.P(text, className="muted"), class_name="message")],
                    className="page")


def live_note(running: bool, interval_ms: int) -> html.Span:
    if running:
        return html.Span(f"● live — refreshing every {interval_ms // 1000} s",
                         className="live live-on")
    return html.Span("not running — showing stored results", className="live live-off")
