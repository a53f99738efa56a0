"""A study: Pareto front (2-D and 3-D), hypervolume history, parallel coordinates of the
searched params, and the table of Pareto trials. Clicking a point opens its trial."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from dashboards import axes, categories, data, figures, insight
from dashboards import components as c
from dashboards.figures_layers import sensitivity_bars
from dashboards.figures_params import importance_bars, parallel_coordinates
from dashboards.readonly import Source
from qsearch.store import objective_info
from qsearch.store.queries import value_of

REFRESH_MS = 5000


def _params_text(params: dict[str, Any] | None) -> str:
    return "  ".join(f"{k}={c.fmt(v, 3)}" for k, v in (params or {}).items())


def header(view: data.StudyView) -> list[Any]:
    n = view.counts
    rec = view.record
    best: dict[str, float] = {}
    for t in view.complete():
        for o in view.objectives:
            v = value_of(t["values"], o.name)
            if v is not None and (o.name not in best or (
                    v > best[o.name] if o.direction == "maximize" else v < best[o.name])):
                best[o.name] = v
    hv = view.snapshot.hypervolume if view.snapshot else None
    apart = sum(1 for t in view.trials if t["state"] == "COMPLETE" and (
        t.get("feasible") is False or t.get("reused_from") is not None))
    stats = [c.stat("finished", n.get("COMPLETE", 0)), c.stat("running", n.get("RUNNING", 0)),
             c.stat("pruned", n.get("PRUNED", 0)), c.stat("failed", n.get("FAIL", 0)),
             c.stat("infeasible or reused", apart),
             c.stat("Pareto trials", len(view.front)),
             c.stat("hypervolume (stored, computed)", hv)]
    stats += [c.stat(f"best {o.axis_title}", best.get(o.name)) for o in view.objectives]
    return [html.Div([html.H2(view.name), c.badge(rec.status),
                      c.live_note(view.running, REFRESH_MS)], className="page-title"),
            html.Div(stats, className="stats")]


def front_rows(view: data.StudyView) -> tuple[list[str], list[dict[str, Any]]]:
    """(value names: objectives then reported values, front rows best-first by the first
    objectives) for the Pareto tables of the page and the report."""
    by_number = {t["number"]: t for t in view.trials}
    names = [o.name for o in view.objectives] + view.reported

    def key(p: dict[str, Any]) -> tuple[float, ...]:
        out = []
        for o in view.objectives[:2]:
            v = value_of(p["values"], o.name) or 0.0
            out.append(-v if o.direction == "maximize" else v)
        return tuple(out)

    rows = []
    for p in sorted(view.front, key=key):
        t = by_number.get(p["trial_number"], {})
        note = ", ".join(x for x in ("knee" if p["is_knee"] else "",
                                     f"baseline {t['baseline']}" if t.get("baseline") else "")
                         if x)
        values = {**(t.get("values") or {}), **p["values"]}
        rows.append({"trial_number": p["trial_number"], "params": t.get("params") or {},
                     "note": note, "values": [value_of(values, n) for n in names]})
    return names, rows


def column_titles(names: list[str], objectives: list[str]) -> list[str]:
    infos = [objective_info(n) for n in names]
    return [f"{i.short} {i.arrow}".strip() if n in objectives else i.short
            for n, i in zip(names, infos)]


def pareto_table(view: data.StudyView) -> Any:
    names, front = front_rows(view)
    rows = [[dcc.Link(f"#{r['trial_number']}", href=c.trial_href(view.name, r["trial_number"])),
             *r["values"], html.Span(_params_text(r["params"]), className="mono small"),
             r["note"]] for r in front]
    if not rows:
        return html.P("No completed trial yet.", className="muted")
    titles = column_titles(names, [o.name for o in view.objectives])
    return c.table(["trial", *titles, "params", "note"], rows, table_id="pareto-table-rows",
                   numeric=range(1, len(names) + 1))


def _figures(view: data.StudyView) -> tuple[Any, Any, Any]:
    f2 = figures.pareto_2d(view.trials, view.front, view.objectives)
    f3 = figures.pareto_3d(view.trials, view.front, view.objectives)
    hv = figures.hypervolume_history(view.snapshots)
    axes_key = "/".join(o.name for o in view.objectives)
    for f in (f2, f3, hv):
        # keep zoom/camera across live refreshes, not across a change of axes
        f.update_layout(uirevision=f"{view.name}/{axes_key}")
    return f2, f3, hv


def caption(view: data.StudyView) -> list[Any]:
    """What the front plots show: each axis with unit and kind, where the front comes from,
    and the markers."""
    objs = view.objectives
    where = (f"the stored Pareto front (snapshot {view.snapshot.snapshot})"
             if view.front_source == "stored" and view.snapshot else
             "the front of the stored values on these axes, recomputed here (the study "
             "optimized " + ", ".join(o.axis_title for o in view.optimized) + ")")
    roles = ("vertical", "horizontal", "colour")
    parts = [html.Span(["Axes: ", "; ".join(f"{r} {o.axis_title} {o.arrow}".strip()
                                            for r, o in zip(roles, objs)), ". "],
                       id="front-axes"),
             html.Span(f"Front: {where}. "),
             "Click a point to open its trial. Faded: dominated trials; outlined: the front; "
             "◇: uniform-precision baselines; ☆: knee; red ×: infeasible; □: reused results "
             "of a duplicate config; grey ○ / ×: pruned / failed trials at their last "
             "reported epoch (values of that epoch, not final). None of those is ever on "
             "the front."]
    groups = categories.classify(view.trials, view.front, objs)
    if figures.has_spread(groups, objs):
        parts.append(" " + figures.SPREAD_NOTE + ".")
    return parts


def cost_options(view: data.StudyView) -> list[dict[str, str]]:
    return [{"label": objective_info(n).axis_title, "value": n} for n in axes.COSTS]


def others_table(view: data.StudyView) -> Any:
    """The trials that are not candidates (pruned, failed, infeasible, reused, running),
    each with how it ended and where it stood."""
    rows = []
    for t in view.trials:
        if t["state"] == "COMPLETE" and t.get("feasible") is not False \
                and t.get("reused_from") is None:
            continue
        vals = t["values"] if t["state"] == "COMPLETE" else t.get("rung") or {}
        rows.append([dcc.Link(f"#{t['number']}", href=c.trial_href(view.name, t["number"])),
                     categories.ending(t), *(value_of(vals, o.name) for o in view.objectives),
                     html.Span((t.get("error") or t.get("detail") or "")[:160],
                               className="small")])
    if not rows:
        return html.P("None: every trial finished, feasible, with its own config.",
                      className="muted")
    return c.table(["trial", "ended", *(o.short for o in view.objectives), "detail"], rows,
                   table_id="other-trials-rows", numeric=range(2, 2 + len(view.objectives)))


def parcoords_figure(src: Source, name: str, objective: str | None) -> Any:
    view = data.study_view(src, name)
    by_name = {o.name: o for o in view.objectives}
    color = by_name.get(objective or "", view.objectives[0])
    fig = parallel_coordinates(view.trials, color, view.objectives)
    fig.update_layout(uirevision=f"{name}/{objective}")
    return fig


def insight_figures(src: Source, view: data.StudyView) -> tuple[Any, Any]:
    """(per-layer sensitivity, parameter importance per objective) figures."""
    sens = sensitivity_bars(insight.sensitivity(src, view.name))
    imp = insight.importances(src, view.name, len(view.trials))
    if isinstance(imp, str):
        return sens, figures.empty(imp)
    return sens, importance_bars(imp, view.optimized,
                                 title="Parameter importance per objective")


def layout(src: Source, name: str) -> html.Div:
    view = data.study_view(src, name)
    f2, f3, hv = _figures(view)
    objectives = [{"label": o.short, "value": o.name} for o in view.objectives]
    cost = axes.cost_of(view.record.objectives)
    return html.Div([
        c.breadcrumbs(("Studies", "/"), (view.name, None)),
        dcc.Store(id="study-name", data=view.name),
        html.Div(header(view), id="study-header"),
        c.card(None, html.Div([
            html.Span("training-cost axis ", className="muted small"),
            dcc.Dropdown(id="front-cost", options=cost_options(view), value=cost,
                         clearable=cost is None, placeholder="add a training-cost axis",
                         className="wide-dropdown"),
            html.Span("(re-draws the front from stored values; nothing is re-run)",
                      className="muted small")], className="card-tools"),
            html.P(caption(view), id="front-caption", className="muted small")),
        html.Div([c.card(None, c.graph("pareto-2d", f2)),
                  c.card(None, c.graph("pareto-3d", f3))], className="grid-2"),
        html.Div([c.card(None, c.graph("hv-history", hv)),
                  c.card(None, html.Div([
                      html.Span("colour by ", className="muted small"),
                      dcc.Dropdown(id="parcoords-objective", options=objectives,
                                   value=objectives[0]["value"], clearable=False,
                                   className="inline-dropdown")], className="card-tools"),
                      dcc.Loading(c.graph("parcoords", figures.empty("loading…")),
                                  type="dot"))], className="grid-2"),
        c.card("Pareto trials", html.Div(pareto_table(view), id="pareto-table")),
        html.Div([c.card(None, dcc.Loading(c.graph("sensitivity", figures.empty("loading…")),
                                           type="dot")),
                  c.card(None, dcc.Loading(c.graph("importance", figures.empty("loading…")),
                                           type="dot"))], className="grid-2"),
        c.card("Pruned, failed, infeasible and reused trials",
               html.Div(others_table(view), id="other-trials")),
        dcc.Interval(id="study-refresh", interval=REFRESH_MS, disabled=not view.running),
    ], className="page")


def register(app: Dash, source: Callable[[], Source]) -> None:
    @app.callback(Output("study-header", "children"), Output("pareto-2d", "figure"),
                  Output("pareto-3d", "figure"), Output("hv-history", "figure"),
                  Output("pareto-table", "children"), Output("study-refresh", "disabled"),
                  Output("front-caption", "children"), Output("other-trials", "children"),
                  Input("study-refresh", "n_intervals"), Input("front-cost", "value"),
                  State("study-name", "data"), prevent_initial_call=True)
    def refresh(_n: int | None, cost: str | None, name: str) -> tuple[Any, ...]:
        view = data.study_view(source(), name, cost if cost in axes.COSTS else None)
        f2, f3, hv = _figures(view)
        return (header(view), f2, f3, hv, pareto_table(view), not view.running,
                caption(view), others_table(view))

    @app.callback(Output("sensitivity", "figure"), Output("importance", "figure"),
                  Input("study-name", "data"), Input("study-refresh", "n_intervals"))
    def insights(name: str, _n: int | None) -> tuple[Any, Any]:
        src = source()
        return insight_figures(src, data.study_view(src, name))

    @app.callback(Output("parcoords", "figure"), Input("study-name", "data"),
                  Input("parcoords-objective", "value"), Input("study-refresh", "n_intervals"))
    def parcoords(name: str, objective: str | None, _n: int | None) -> Any:
        return parcoords_figure(source(), name, objective)

    @app.callback(Output("url", "pathname"), Input("pareto-2d", "clickData"),
                  Input("pareto-3d", "clickData"), State("study-name", "data"),
                  prevent_initial_call=True)
    def open_trial(click2: dict | None, click3: dict | None, name: str) -> Any:
        click = click2 if ctx.triggered_id == "pareto-2d" else click3
        points = (click or {}).get("points") or []
        custom = points[0].get("customdata") if points else None
        if not custom:
            return no_update
        return c.trial_href(name, int(custom[0]))
