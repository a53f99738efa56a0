"""Plotly figures of a study's fronts, built from plain data (lists of dicts from
:mod:`dashboards.data`).

Nothing here reads the database, so the dashboard, the HTML report and the tests build the
same figures from the same rows. Every point that stands for a trial carries the trial
number as ``customdata[0]``: clicking it opens that trial, and tests compare it to the store.

The Pareto plots take the axes as registry facts (:class:`~qsearch.store.ObjectiveInfo`):
the first objective on the vertical axis, the second on the horizontal one, the third (if
any) as colour; every axis title says label, unit and kind (:mod:`dashboards.axes`).
Which trial gets which marker is :func:`dashboards.categories.classify`'s decision.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from dashboards import axes
from dashboards.categories import Groups, classify, v
from qsearch.store import ObjectiveInfo, objective_info

FONT = "Inter, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
COLORSCALE = "Viridis"
FRONT_LINE = "#1f2937"
ACCENT = "#2563eb"
GREY = "#9ca3af"
#: Marker kinds drawn apart from the candidates: (legend name, symbol, colour).
APART = {"infeasible": ("infeasible (violates a constraint)", "x", "#dc2626"),
         "reused": ("reused result (duplicate config)", "square-open", "#6b7280"),
         "pruned": ("pruned (at its last rung)", "circle-open", GREY),
         "failed": ("failed (at its last epoch)", "x-thin-open", GREY)}
SPREAD_NOTE = "error bars: ± 1 standard deviation over the seeds of each config (repeats)"


def _style(fig: go.Figure, title: str | None = None, height: int = 420) -> go.Figure:
    """Shared look. The legend sits above the plot, where nothing else is drawn (below, it
    ran into the x-axis title); axes push the margins to fit their titles."""
    fig.update_layout(
        template="plotly_white", height=height, font={"family": FONT, "size": 12},
        title={"text": title, "x": 0.01, "y": 0.98, "yanchor": "top", "font": {"size": 15}}
        if title else None,
        margin={"l": 60, "r": 20, "t": 64 if title else 20, "b": 40},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0,
                "font": {"size": 11}},
        hoverlabel={"font": {"family": FONT}})
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def empty(message: str, height: int = 320) -> go.Figure:
    """A blank figure that says why it is blank (no trials yet, no LTS in this trial ...)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font={"size": 14, "color": "#6b7280"},
                       xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, height=height)


def _hover(objectives: Sequence[ObjectiveInfo]) -> str:
    lines = [f"{o.label} %{{customdata[{i + 1}]:.4g}}{' ' + o.unit if o.unit else ''} ({o.kind})"
             if o.kind else f"{o.label} %{{customdata[{i + 1}]:.4g}}"
             for i, o in enumerate(objectives)]
    return ("<b>trial %{customdata[0]}</b><br>" + "<br>".join(lines)
            + f"<br>%{{customdata[{len(objectives) + 1}]}}<extra></extra>")


def _custom(rows: Sequence[dict[str, Any]], objectives: Sequence[ObjectiveInfo]) -> list[list[Any]]:
    return [[int(r["number"]), *(v(r, o.name) for o in objectives), r.get("tag") or ""]
            for r in rows]


def _color_range(rows: Sequence[dict[str, Any]], name: str) -> tuple[float, float]:
    vals = [float(x) for r in rows if (x := v(r, name)) is not None]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    return (lo, hi) if hi > lo else (lo - 0.05, hi + 0.05)


def _coloraxis(rows: Sequence[dict[str, Any]], c: ObjectiveInfo | None) -> dict[str, Any]:
    if c is None:
        return {"colorscale": COLORSCALE, "showscale": False}
    cmin, cmax = _color_range(rows, c.name)
    # Better is always the bright end of the scale.
    return {"colorscale": COLORSCALE, "cmin": cmin, "cmax": cmax,
            "reversescale": c.direction == "minimize",
            "colorbar": {"title": {"text": axes.title(c, 16)}, "thickness": 14}}


def _axes(objectives: Sequence[str | ObjectiveInfo]) -> list[ObjectiveInfo]:
    return [o if isinstance(o, ObjectiveInfo) else objective_info(o) for o in objectives]


def _errors(rows: Sequence[dict[str, Any]], o: ObjectiveInfo) -> dict[str, Any] | None:
    """Plotly error bars of ``o`` from the stored spread over seeds (None without any)."""
    spread = [(r.get("spread") or {}).get(o.name) for r in rows]
    if not any(s for s in spread):
        return None
    return {"type": "data", "array": [s if s is not None else 0.0 for s in spread],
            "visible": True, "thickness": 1.2, "width": 3, "color": "#475569"}


def has_spread(groups: Groups, objectives: Sequence[ObjectiveInfo]) -> bool:
    return any(_errors(groups.candidates(), o) for o in objectives)


def _apart_2d(fig: go.Figure, g: Groups, x: ObjectiveInfo, y: ObjectiveInfo,
              objs: list[ObjectiveInfo], hover: str) -> None:
    for kind, (name, symbol, color) in APART.items():
        rows = getattr(g, kind)
        if rows:
            fig.add_trace(go.Scatter(
                name=name, x=[v(r, x.name) for r in rows], y=[v(r, y.name) for r in rows],
                mode="markers", customdata=_custom(rows, objs), hovertemplate=hover,
                marker={"symbol": symbol, "size": 9, "color": color, "opacity": 0.8,
                        "line": {"width": 1.5, "color": color}}))


def pareto_2d(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              objectives: Sequence[str | ObjectiveInfo], title: str | None = None) -> go.Figure:
    """First objective against the second, every candidate coloured by the third; dominated
    trials faded, the front solid and outlined, baselines as labelled diamonds, the knee as a
    star; infeasible, reused, pruned and failed trials each with their own grey or red marker
    (never on the front); error bars where the config was trained with several seeds."""
    objs = _axes(objectives)
    if len(objs) < 2:
        return empty("a 2-D front needs two objectives", height=460)
    y, x, c = objs[0], objs[1], (objs[2] if len(objs) > 2 else None)
    g = classify(trials, front, objs)
    if not g.plotted():
        return empty("no completed trial yet", height=460)
    hover = _hover(objs)

    def colors(rows: list[dict[str, Any]]) -> Any:
        return [v(r, c.name) for r in rows] if c else ACCENT

    fig = go.Figure()
    ordered = sorted(g.front, key=lambda r: (v(r, x.name), v(r, y.name)))
    for name, rows, marker in (
            ("dominated", g.dominated, {"size": 8, "opacity": 0.28, "line": {"width": 0}}),
            ("Pareto front", ordered, {"size": 13, "line": {"width": 1.5, "color": FRONT_LINE}})):
        fig.add_trace(go.Scatter(
            name=name, x=[v(r, x.name) for r in rows], y=[v(r, y.name) for r in rows],
            mode="markers", customdata=_custom(rows, objs), hovertemplate=hover,
            error_x=_errors(rows, x), error_y=_errors(rows, y),
            marker={**marker, "color": colors(rows), "coloraxis": "coloraxis"}))
    knee = [r for r in ordered if r["is_knee"]]
    if knee:
        fig.add_trace(go.Scatter(
            name="knee", x=[v(r, x.name) for r in knee], y=[v(r, y.name) for r in knee],
            mode="markers", customdata=_custom(knee, objs), hovertemplate=hover,
            marker={"symbol": "star", "size": 20, "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": "#dc2626"}}))
    if g.baselines:
        b = g.baselines
        fig.add_trace(go.Scatter(
            name="uniform-precision baseline", x=[v(r, x.name) for r in b],
            y=[v(r, y.name) for r in b], mode="markers+text",
            text=[r["baseline"] for r in b], textposition="top center",
            textfont={"size": 10, "color": "#374151"}, customdata=_custom(b, objs),
            hovertemplate=hover, marker={"symbol": "diamond-open", "size": 16,
                                         "line": {"width": 2, "color": "#111827"}}))
    _apart_2d(fig, g, x, y, objs, hover)
    fig.update_layout(coloraxis=_coloraxis(g.candidates(), c), clickmode="event",
                      hovermode="closest")
    fig.update_xaxes(title_text=axes.title(x, 60), range=axes.padded_range(
        v(r, x.name) for r in g.plotted()))
    fig.update_yaxes(title_text=axes.title(y, 40), range=axes.padded_range(
        v(r, y.name) for r in g.plotted()))
    return _style(fig, title, height=500)


def pareto_3d(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              objectives: Sequence[str | ObjectiveInfo], title: str | None = None) -> go.Figure:
    """The first three objectives in 3-D (second, third, first on x, y, z), coloured by the
    third. Each axis range is the points' extent plus padding (autorange put markers on the
    walls, where half of each was cut)."""
    objs = _axes(objectives)
    if len(objs) < 3:
        return empty("a 3-D view needs three objectives", height=500)
    z, x, y = objs[0], objs[1], objs[2]
    g = classify(trials, front, objs)
    if not g.plotted():
        return empty("no completed trial yet", height=500)
    hover = _hover(objs)
    fig = go.Figure()

    def add(name: str, rows: list[dict[str, Any]], marker: dict[str, Any], **kw: Any) -> None:
        fig.add_trace(go.Scatter3d(
            name=name, x=[v(r, x.name) for r in rows], y=[v(r, y.name) for r in rows],
            z=[v(r, z.name) for r in rows], customdata=_custom(rows, objs), hovertemplate=hover,
            marker=marker, **kw))

    add("dominated", g.dominated, {"size": 4, "opacity": 0.25, "coloraxis": "coloraxis",
                                   "color": [v(t, y.name) for t in g.dominated]},
        mode="markers")
    add("Pareto front", g.front, {"size": 7, "coloraxis": "coloraxis",
                                  "color": [v(r, y.name) for r in g.front],
                                  "line": {"width": 1, "color": FRONT_LINE}}, mode="markers")
    if g.baselines:
        add("uniform-precision baseline", g.baselines,
            {"symbol": "diamond-open", "size": 8, "color": "#111827"}, mode="markers+text",
            text=[b["baseline"] for b in g.baselines], textfont={"size": 10})
    for kind, (name, symbol, color) in APART.items():
        rows = getattr(g, kind)
        if rows:
            sym = {"circle-open": "circle-open", "square-open": "square-open"}.get(symbol, "x")
            add(name, rows, {"symbol": sym, "size": 4, "color": color}, mode="markers")
    pts = g.plotted()
    scene = {f"{a}axis": {"title": {"text": axes.wrap(axes.compact(o), 24)},
                          "range": axes.padded_range(v(r, o.name) for r in pts)}
             for a, o in (("x", x), ("y", y), ("z", z))}
    fig.update_layout(coloraxis=_coloraxis(g.candidates(), y),
                      scene={**scene, "aspectmode": "cube",
                             "camera": {"eye": {"x": 1.9, "y": -1.9, "z": 1.1}}})
    fig = _style(fig, title, height=500)
    fig.update_layout(margin={"l": 10, "r": 10, "t": 64 if title else 30, "b": 10})
    return fig


def hypervolume_history(snapshots: Sequence[dict[str, Any]],
                        title: str | None = "Hypervolume over time") -> go.Figure:
    """The stored hypervolume of every snapshot. The reference point can move while a study
    runs (it defaults to 1.1 x the worst observed size), which changes the scale; snapshots
    where it moved are marked so a jump is not read as progress."""
    rows = [s for s in snapshots if s.get("hypervolume") is not None]
    if not rows:
        return empty("no Pareto snapshot yet")
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        name="hypervolume", x=[s["created_at"] for s in rows], y=[s["hypervolume"] for s in rows],
        mode="lines+markers", line={"shape": "hv", "color": ACCENT, "width": 2},
        marker={"size": 5}, customdata=[[s["snapshot"], s["n_complete"], s.get("trigger_trial")]
                                        for s in rows],
        hovertemplate="snapshot %{customdata[0]}<br>%{customdata[1]} complete trials<br>"
                      "after trial %{customdata[2]}<br>hypervolume %{y:.4g}<extra></extra>"))
    moved = [b for a, b in itertools.pairwise(rows) if a.get("reference_point") != b.get("reference_point")]
    if moved:
        fig.add_trace(go.Scatter(
            name="reference point moved", x=[s["created_at"] for s in moved],
            y=[s["hypervolume"] for s in moved], mode="markers",
            marker={"symbol": "x", "size": 9, "color": "#dc2626"},
            hovertext=[f"reference {s['reference_point']}" for s in moved],
            hoverinfo="text"))
    # Both axes padded: with the first snapshot in the corner its date ran into the "0" of
    # the hypervolume axis.
    times = [s["created_at"] for s in rows]
    pad = (max(times) - min(times)) * 0.04 if len(times) > 1 else None
    top = max(s["hypervolume"] for s in rows) or 1.0
    fig.update_xaxes(title_text="time (UTC)",
                     range=[min(times) - pad, max(times) + pad] if pad else None)
    fig.update_yaxes(title_text=axes.wrap("hypervolume of the optimized objectives "
                                          "(computed, vs the reference point)", 40),
                     range=[-0.08 * top, 1.08 * top])
    return _style(fig, title, height=360)


