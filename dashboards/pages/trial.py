"""One trial: its values, per-layer bit-widths and frozen fractions, per-epoch curves, the
full config, and a button that downloads the trial as JSON (:func:`dashboards.data.trial_record`,
read-only; ``qsearch export`` writes weights and deployable files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dash import Dash, Input, Output, State, dcc, html

from dashboards import components as c
from dashboards import data
from dashboards.figures_layers import epoch_curves, frozen_fractions, layer_bits
from dashboards.readonly import Source
from qsearch.errors import QsearchError

REFRESH_MS = 5000


def header(view: data.TrialView) -> list[Any]:
    t = view.trial
    tags = []
    if view.on_front:
        tags.append(html.Span("Pareto", className="tag tag-front"))
    if view.is_knee:
        tags.append(html.Span("knee", className="tag tag-knee"))
    label = data.baseline_label(t.config)
    if label:
        tags.append(html.Span(f"baseline {label}", className="tag"))
    if t.feasible is False:
        tags.append(html.Span("infeasible", className="tag tag-infeasible"))
    running = view.running or view.record.status == "running"
    if t.state in ("PRUNED", "FAIL", "RUNNING"):
        # No final values: what it measured at its last reported epoch, labelled so.
        at = view.last_epoch
        stats = [c.stat(f"{o.axis_title} {o.arrow} at epoch {at}".strip(), v)
                 for o, v in view.rung()] if at else []
    else:
        stats = [c.stat(f"{o.axis_title} {o.arrow}".strip(), v) for o, v in view.values()]
    stats = [c.stat("state", view.ending(), "stat-wide"), *stats]
    stats += [c.stat("epochs", f"{t.epochs_completed or 0} / {t.max_epochs or '?'}"),
              c.stat("detail", t.detail or "–"), c.stat("started", c.fmt(t.started_at)),
              c.stat("finished", c.fmt(t.finished_at)), c.stat("retries", t.retries or 0),
              c.stat("ran on", _where(t.placement))]
    out: list[Any] = [
        html.Div([html.H2(f"Trial #{t.number}"), c.badge(t.state), *tags,
                  c.live_note(running, REFRESH_MS)], className="page-title"),
        html.Div(stats, className="stats")]
    if t.error:
        out.append(html.Pre(t.error, className="error-box"))
    if t.reused_from is not None:
        out.append(html.P(["Reused result: same config as ",
                           dcc.Link(f"trial #{t.reused_from}",
                                    href=c.trial_href(view.record.name, t.reused_from)),
                           ", which was trained; this trial was not."], className="muted"))
    return out


def _where(placement: dict[str, Any] | None) -> str:
    """The latest attempt's Ray node (short id), GPU ids and torch device."""
    if not placement:
        return "–"
    gpus = ",".join(placement.get("gpu_ids") or []) or "none"
    return f"node {str(placement.get('node_id', '?'))[:8]} · GPU {gpus} · {placement.get('device')}"


def _config_text(view: data.TrialView) -> str:
    t = view.trial
    doc = {"params": t.params, "config": t.config}
    return json.dumps(doc, indent=2, sort_keys=False, default=str)


def _parts(view: data.TrialView) -> tuple[Any, ...]:
    why = view.why_no_layers()
    return (header(view), layer_bits(view.layers, why=why),
            frozen_fractions(view.layers, why=why), epoch_curves(view.epochs),
            _config_text(view))


def layout(src: Source, name: str, number: int) -> html.Div:
    view = data.trial_view(src, name, number)
    head, bits, frozen, curves, config = _parts(view)
    return html.Div([
        c.breadcrumbs(("Studies", "/"), (name, c.study_href(name)), (f"trial #{number}", None)),
        dcc.Store(id="trial-key", data={"study": name, "number": number}),
        html.Div(head, id="trial-header"),
        html.Div([c.card(None, c.graph("layer-bits", bits)),
                  c.card(None, c.graph("layer-frozen", frozen))], className="grid-2"),
        c.card(None, c.graph("epoch-curves", curves)),
        c.card("Configuration", html.Div([
            html.Button("Download trial JSON", id="export-button", className="button",
                        title="this trial as stored: values, params, config, per-layer "
                              "precision (qsearch export writes the weights)"),
            html.Span(id="export-message", className="muted small")], className="card-tools"),
            dcc.Download(id="export-download"),
            html.Pre(config, id="trial-config", className="config")),
        dcc.Interval(id="trial-refresh", interval=REFRESH_MS,
                     disabled=not (view.running or view.record.status == "running")),
    ], className="page")


def export_json(src: Source, name: str, number: int) -> tuple[str, str]:
    """(file name, JSON text) of the trial's record, read from the store (nothing written:
    the weights and the deployable export are ``qsearch export``'s job)."""
    doc = data.trial_record(src, name, number)
    return f"{name}-trial-{number}.json", json.dumps(doc, indent=2, default=str)


def register(app: Dash, source: Callable[[], Source]) -> None:
    @app.callback(Output("trial-header", "children"), Output("layer-bits", "figure"),
                  Output("layer-frozen", "figure"), Output("epoch-curves", "figure"),
                  Output("trial-config", "children"), Output("trial-refresh", "disabled"),
                  Input("trial-refresh", "n_intervals"), State("trial-key", "data"),
                  prevent_initial_call=True)
    def refresh(_n: int | None, key: dict) -> tuple[Any, ...]:
        view = data.trial_view(source(), key["study"], int(key["number"]))
        running = view.running or view.record.status == "running"
        return (*_parts(view), not running)

    @app.callback(Output("export-download", "data"), Output("export-message", "children"),
                  Input("export-button", "n_clicks"), State("trial-key", "data"),
                  prevent_initial_call=True)
    def export(_clicks: int | None, key: dict) -> tuple[Any, str]:
        try:
            filename, text = export_json(source(), key["study"], int(key["number"]))
        except QsearchError as e:
            return None, f"cannot export: {e}"
        return dcc.send_string(text, filename), f"exported {filename}"
