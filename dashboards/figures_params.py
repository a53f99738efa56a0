"""Figures over the searched parameters: parallel coordinates of the COMPLETE trials and the
parameter importance per objective. Plain data in, Plotly figures out (no database)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from dashboards import axes
from dashboards.figures import COLORSCALE, _axes, _style, empty
from dashboards.categories import v as _v
from qsearch.store import ObjectiveInfo

def _dimension(name: str, values: list[Any]) -> dict[str, Any]:
    """One parcoords axis. Numbers stay numbers (log10 when they span > 2 decades, e.g. the
    learning rate); anything else (categorical, bool) becomes evenly spaced codes with the
    choices as tick labels."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) == len(values) and len(set(nums)) > 8:
        lo, hi = min(nums), max(nums)
        if lo > 0 and hi / lo > 100:
            ticks = [10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
            return {"label": f"{name} (log)", "values": [math.log10(v) for v in nums],
                    "tickvals": [math.log10(t) for t in ticks], "ticktext": [f"{t:g}" for t in ticks]}
        return {"label": name, "values": nums}
    labels = sorted({_label(v) for v in values}, key=_sort_key)
    code = {lab: i for i, lab in enumerate(labels)}
    return {"label": name, "values": [code[_label(v)] for v in values],
            "tickvals": list(range(len(labels))), "ticktext": labels,
            "range": [-0.3, len(labels) - 0.7] if len(labels) > 1 else [-1, 1]}


def _label(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sort_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def parallel_coordinates(trials: Sequence[dict[str, Any]], color: str | ObjectiveInfo,
                         objectives: Sequence[str | ObjectiveInfo],
                         title: str | None = "Searched parameters") -> go.Figure:
    """Plotly's parcoords over the searched params of every COMPLETE trial, then the
    objectives (registry labels), coloured by ``color`` (brush an axis to filter).

    Why not ``optuna.visualization.plot_parallel_coordinate``: Optuna 5 draws one Scatter
    trace per trial, which is slow to send and render at 1,000 trials; one ``Parcoords``
    trace (WebGL) stays fast and is interactive.
    """
    c = _axes([color])[0]
    objs = _axes(objectives)
    # A reused trial repeats an earlier trial's line exactly: drawn once.
    rows = [t for t in trials if t["state"] == "COMPLETE" and _v(t, c.name) is not None
            and t.get("reused_from") is None]
    if not rows:
        return empty("no completed trial yet")
    keys: list[str] = []
    for t in rows:
        for k in (t.get("params") or {}):
            if k not in keys:
                keys.append(k)
    dims = [_dimension(k, [(t.get("params") or {}).get(k) for t in rows]) for k in keys]
    # Labels stand upright (one line each, so neighbours never touch): the objective's
    # name with unit and kind, shorter than its registry label.
    dims += [{"label": axes.compact(o), "values": [_v(t, o.name) for t in rows]}
             for o in objs if all(_v(t, o.name) is not None for t in rows)]
    scale = COLORSCALE if c.direction != "minimize" else COLORSCALE + "_r"
    fig = go.Figure(go.Parcoords(
        line={"color": [_v(t, c.name) for t in rows], "colorscale": scale, "showscale": True,
              "colorbar": {"title": {"text": axes.title(c, 16)}, "thickness": 14,
                           "x": 1.0, "xanchor": "left", "xpad": 40}},
        dimensions=dims, labelangle=-90, labelside="top", labelfont={"size": 11},
        customdata=[int(t["number"]) for t in rows]))
    fig = _style(fig, title, height=560)
    # Room above for the upright labels and on the right for the last axis's ticks and the
    # colour bar.
    top = 40 + 6 * max(len(d["label"]) for d in dims)
    fig.update_layout(margin={"l": 50, "r": 150, "t": top, "b": 30})
    return fig




def importance_bars(importances: Sequence[Any], objectives: Sequence[ObjectiveInfo],
                    title: str | None = None) -> go.Figure:
    """One horizontal bar per searched parameter and objective: its share of the objective's
    importance (Optuna's evaluator, normalised to sum to 1 per objective), the parameters
    ordered by their largest share."""
    if not importances:
        return empty("no importance computed")
    by_name = {o.name: o for o in objectives}
    share: dict[str, float] = {}
    for imp in importances:
        for k, x in imp.importances.items():
            share[k] = max(share.get(k, 0.0), x)
    params = sorted(share, key=lambda k: share[k])  # largest at the top of a horizontal bar
    first = importances[0]
    fig = go.Figure()
    for imp in importances:
        o = by_name.get(imp.objective) or _axes([imp.objective])[0]
        fig.add_trace(go.Bar(
            name=f"{o.label} {o.arrow}".strip(), orientation="h", y=params,
            x=[imp.importances.get(k, 0.0) for k in params],
            hovertemplate=f"%{{y}}<br>{o.label}: %{{x:.1%}} of its importance<extra></extra>"))
    fig.update_layout(barmode="group", bargap=0.2)
    fig.update_xaxes(title_text=axes.wrap(
        f"share of the objective's importance (computed: {first.evaluator} over "
        f"{first.n_trials} complete trials)", 60), tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(title_text="searched parameter", type="category")
    return _style(fig, title, height=max(300, 120 + 28 * len(params) * len(importances)))
