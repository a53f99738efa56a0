"""Plotly figures built from plain data (lists of dicts from :mod:`dashboards.data`).

Nothing here reads the database, so the dashboard, the HTML report and the tests build the
same figures from the same rows. Every point that stands for a trial carries the trial
number as ``customdata[0]``: clicking it opens that trial, and tests compare it to the store.

The Pareto plots take the study's objectives as registry facts
(:class:`~qsearch.store.ObjectiveInfo`): the first objective on the vertical axis, the
second on the horizontal one, the third (if any) as colour; axis titles, hover text and
colour bars use the registry's labels and units.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qsearch.store import ObjectiveInfo, objective_info
from qsearch.store.queries import value_of

FONT = "Inter, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
COLORSCALE = "Viridis"
FRONT_LINE = "#1f2937"
ACCENT = "#2563eb"
BITS_COLORS = {"w_bits": "#2563eb", "a_bits": "#f59e0b", "g_bits": "#10b981"}


def _style(fig: go.Figure, title: str | None = None, height: int = 420) -> go.Figure:
    fig.update_layout(
        template="plotly_white", height=height, font={"family": FONT, "size": 12},
        title={"text": title, "x": 0.01, "font": {"size": 15}} if title else None,
        margin={"l": 60, "r": 20, "t": 56 if title else 20, "b": 90},
        legend={"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0},
        hoverlabel={"font": {"family": FONT}})
    return fig


def empty(message: str, height: int = 320) -> go.Figure:
    """A blank figure that says why it is blank (no trials yet, no LTS in this trial ...)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font={"size": 14, "color": "#6b7280"},
                       xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, height=height)


def _v(row: dict[str, Any], name: str) -> float | None:
    return value_of(row.get("values") or {}, name)


def _hover(objectives: Sequence[ObjectiveInfo]) -> str:
    lines = [f"{o.label} %{{customdata[{i + 1}]:.4g}}{' ' + o.unit if o.unit else ''}"
             for i, o in enumerate(objectives)]
    return ("<b>trial %{customdata[0]}</b><br>" + "<br>".join(lines)
            + f"<br>%{{customdata[{len(objectives) + 1}]}}<extra></extra>")


def _custom(rows: Sequence[dict[str, Any]], objectives: Sequence[ObjectiveInfo]) -> list[list[Any]]:
    return [[int(r["number"]), *(_v(r, o.name) for o in objectives), r.get("tag") or ""]
            for r in rows]


def _tag(t: dict[str, Any]) -> str:
    parts = []
    if t.get("is_knee"):
        parts.append("knee")
    if t.get("on_front"):
        parts.append("Pareto")
    if t.get("baseline"):
        parts.append(f"baseline {t['baseline']}")
    return ", ".join(parts)


def _better(o: ObjectiveInfo, v: float) -> float:
    """A sort key where smaller is better."""
    return -v if o.direction == "maximize" else v


def _split(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
           objectives: Sequence[ObjectiveInfo]
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(front rows from the stored snapshot, dominated COMPLETE rows, baseline rows)."""
    by_number = {int(t["number"]): t for t in trials}
    front_rows = []
    for p in front:
        t = by_number.get(int(p["trial_number"]), {})
        row = {"number": int(p["trial_number"]), "values": p["values"],
               "is_knee": bool(p.get("is_knee")), "on_front": True,
               "baseline": t.get("baseline")}
        row["tag"] = _tag(row)
        front_rows.append(row)
    on_front = {r["number"] for r in front_rows}
    complete = [t for t in trials if t["state"] == "COMPLETE"
                and all(_v(t, o.name) is not None for o in objectives)]
    dominated = [{**t, "tag": _tag(t)} for t in complete if int(t["number"]) not in on_front]
    # One marker per bit-width pair: the best plain-LSQ run at that precision (first
    # objective, then second), i.e. the baseline a mixed-precision or method point has to beat.
    best: dict[str, dict[str, Any]] = {}

    def key(r: dict[str, Any]) -> tuple[float, ...]:
        return tuple(_better(o, _v(r, o.name) or 0.0) for o in objectives[:2])

    for r in front_rows + dominated:
        lab = r.get("baseline")
        if lab and (lab not in best or key(r) < key(best[lab])):
            best[lab] = r
    x = objectives[1].name if len(objectives) > 1 else objectives[0].name
    baselines = sorted(best.values(), key=lambda r: _v(r, x) or 0.0)
    return front_rows, dominated, baselines


def _color_range(rows: Sequence[dict[str, Any]], name: str) -> tuple[float, float]:
    vals = [float(v) for r in rows if (v := _v(r, name)) is not None]
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
            "colorbar": {"title": {"text": c.label.replace(" ", "<br>", 1)}, "thickness": 14}}


def _axes(objectives: Sequence[str | ObjectiveInfo]) -> list[ObjectiveInfo]:
    return [o if isinstance(o, ObjectiveInfo) else objective_info(o) for o in objectives]


def pareto_2d(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              objectives: Sequence[str | ObjectiveInfo], title: str | None = None) -> go.Figure:
    """First objective against the second, every COMPLETE trial coloured by the third;
    dominated trials faded, the stored Pareto front solid and outlined, baselines as labelled
    diamonds, the knee as a star."""
    objs = _axes(objectives)
    if len(objs) < 2:
        return empty("a 2-D front needs two objectives", height=460)
    y, x, c = objs[0], objs[1], (objs[2] if len(objs) > 2 else None)
    title = title if title is not None else f"Pareto front: {y.label} vs {x.label}"
    front_rows, dominated, baselines = _split(trials, front, objs)
    if not front_rows and not dominated:
        return empty("no completed trial yet", height=460)
    hover = _hover(objs)

    def colors(rows: list[dict[str, Any]]) -> Any:
        return [_v(r, c.name) for r in rows] if c else ACCENT

    fig = go.Figure()
    fig.add_trace(go.Scatter(
        name="dominated", x=[_v(t, x.name) for t in dominated],
        y=[_v(t, y.name) for t in dominated], mode="markers",
        customdata=_custom(dominated, objs), hovertemplate=hover,
        marker={"size": 8, "opacity": 0.28, "color": colors(dominated),
                "coloraxis": "coloraxis", "line": {"width": 0}}))
    ordered = sorted(front_rows, key=lambda r: (_v(r, x.name), _v(r, y.name)))
    fig.add_trace(go.Scatter(
        name="Pareto front", x=[_v(r, x.name) for r in ordered],
        y=[_v(r, y.name) for r in ordered], mode="markers", customdata=_custom(ordered, objs),
        hovertemplate=hover, marker={"size": 13, "color": colors(ordered),
                                     "coloraxis": "coloraxis",
                                     "line": {"width": 1.5, "color": FRONT_LINE}}))
    knee = [r for r in ordered if r["is_knee"]]
    if knee:
        fig.add_trace(go.Scatter(
            name="knee", x=[_v(r, x.name) for r in knee],
            y=[_v(r, y.name) for r in knee], mode="markers",
            customdata=_custom(knee, objs), hovertemplate=hover,
            marker={"symbol": "star", "size": 20, "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": "#dc2626"}}))
    if baselines:
        fig.add_trace(go.Scatter(
            name="uniform-precision baseline", x=[_v(b, x.name) for b in baselines],
            y=[_v(b, y.name) for b in baselines], mode="markers+text",
            text=[b["baseline"] for b in baselines], textposition="top center",
            textfont={"size": 10, "color": "#374151"}, customdata=_custom(baselines, objs),
            hovertemplate=hover, marker={"symbol": "diamond-open", "size": 16,
                                         "line": {"width": 2, "color": "#111827"}}))
    fig.update_layout(coloraxis=_coloraxis(front_rows + dominated, c), clickmode="event",
                      hovermode="closest")
    fig.update_xaxes(title_text=x.axis_title)
    fig.update_yaxes(title_text=y.axis_title)
    return _style(fig, title, height=460)


def pareto_3d(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              objectives: Sequence[str | ObjectiveInfo], title: str | None = None) -> go.Figure:
    """The first three objectives in 3-D (second, third, first on x, y, z), coloured by the
    third."""
    objs = _axes(objectives)
    if len(objs) < 3:
        return empty("a 3-D view needs three objectives", height=460)
    z, x, y = objs[0], objs[1], objs[2]
    title = title if title is not None else f"3-D view: {z.label}, {x.label}, {y.label}"
    front_rows, dominated, baselines = _split(trials, front, objs)
    if not front_rows and not dominated:
        return empty("no completed trial yet", height=460)
    hover = _hover(objs)
    fig = go.Figure()

    def add(name: str, rows: list[dict[str, Any]], marker: dict[str, Any], **kw: Any) -> None:
        fig.add_trace(go.Scatter3d(
            name=name, x=[_v(r, x.name) for r in rows], y=[_v(r, y.name) for r in rows],
            z=[_v(r, z.name) for r in rows], customdata=_custom(rows, objs), hovertemplate=hover,
            marker=marker, **kw))

    add("dominated", dominated, {"size": 4, "opacity": 0.25, "coloraxis": "coloraxis",
                                 "color": [_v(t, y.name) for t in dominated]}, mode="markers")
    add("Pareto front", front_rows, {"size": 7, "coloraxis": "coloraxis",
                                     "color": [_v(r, y.name) for r in front_rows],
                                     "line": {"width": 1, "color": FRONT_LINE}}, mode="markers")
    if baselines:
        add("uniform-precision baseline", baselines,
            {"symbol": "diamond-open", "size": 8, "color": "#111827"}, mode="markers+text",
            text=[b["baseline"] for b in baselines], textfont={"size": 10})
    fig.update_layout(
        coloraxis=_coloraxis(front_rows + dominated, y),
        scene={"xaxis_title": x.short, "yaxis_title": y.short, "zaxis_title": z.short,
               "camera": {"eye": {"x": 1.6, "y": -1.6, "z": 0.9}}})
    fig = _style(fig, title, height=460)
    fig.update_layout(margin={"l": 0, "r": 0, "t": 56, "b": 10},
                      legend={"y": 0.02, "yanchor": "bottom"})
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
    fig.update_xaxes(title_text="time (UTC)")
    fig.update_yaxes(title_text="hypervolume", rangemode="tozero")
    return _style(fig, title, height=360)


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
    rows = [t for t in trials if t["state"] == "COMPLETE" and _v(t, c.name) is not None]
    if not rows:
        return empty("no completed trial yet")
    keys: list[str] = []
    for t in rows:
        for k in (t.get("params") or {}):
            if k not in keys:
                keys.append(k)
    dims = [_dimension(k, [(t.get("params") or {}).get(k) for t in rows]) for k in keys]
    dims += [{"label": o.short, "values": [_v(t, o.name) for t in rows]}
             for o in objs if all(_v(t, o.name) is not None for t in rows)]
    scale = COLORSCALE if c.direction != "minimize" else COLORSCALE + "_r"
    fig = go.Figure(go.Parcoords(
        line={"color": [_v(t, c.name) for t in rows], "colorscale": scale, "showscale": True,
              "colorbar": {"title": {"text": c.short}, "thickness": 14}},
        dimensions=dims, labelangle=-20, labelside="top",
        customdata=[int(t["number"]) for t in rows]))
    fig = _style(fig, title, height=420)
    fig.update_layout(margin={"l": 50, "r": 40, "t": 110, "b": 30})
    return fig


def layer_bits(layers: Sequence[Any], title: str | None = "Per-layer bit-widths"
               ) -> go.Figure:
    if not layers:
        return empty("no per-layer record (the trial has not finished)")
    names = [r["name"] for r in layers]
    fig = go.Figure()
    for key, label in (("w_bits", "weights"), ("a_bits", "activations"), ("g_bits", "gradients")):
        fig.add_trace(go.Bar(name=label, x=names, y=[r[key] for r in layers],
                             marker_color=BITS_COLORS[key], text=[r[key] for r in layers],
                             textposition="outside", cliponaxis=False,
                             hovertemplate=f"%{{x}}<br>{label}: %{{y}} bits<extra></extra>"))
    top = max(max(r[k] for k in BITS_COLORS) for r in layers)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="bits", range=[0, top * 1.18])
    fig.update_xaxes(title_text="layer", type="category")
    return _style(fig, title, height=380)


def frozen_fractions(layers: Sequence[Any],
                     title: str | None = "Frozen fraction per layer (time-averaged)") -> go.Figure:
    if not layers:
        return empty("no per-layer record (the trial has not finished)")
    names = [r["name"] for r in layers]
    vals = [float(r.get("frozen_fraction") or 0.0) for r in layers]
    fig = go.Figure(go.Bar(x=names, y=vals, marker_color="#8b5cf6",
                           text=[f"{v:.0%}" for v in vals], textposition="outside",
                           cliponaxis=False, customdata=[[r["params"], r["macs"]] for r in layers],
                           hovertemplate="%{x}<br>frozen %{y:.1%}<br>%{customdata[0]} weights, "
                                         "%{customdata[1]} MACs<extra></extra>"))
    fig.update_yaxes(title_text="frozen fraction", range=[0, 1.12], tickformat=".0%")
    fig.update_xaxes(title_text="layer", type="category")
    return _style(fig, title, height=380)


def _series(epochs: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in epochs:
        m = e.get("metrics") or {}
        v = e.get(key) if e.get(key) is not None else m.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            xs.append(int(e["epoch"]))
            ys.append(float(v))
    return xs, ys


def epoch_curves(epochs: Sequence[dict[str, Any]], title: str | None = "Per-epoch curves"
                 ) -> go.Figure:
    """Accuracy (validation and test), loss, LTS frozen fraction and TR measured-vs-target transition rate, one
    panel each; method panels appear only when the trial reported those metrics."""
    if not epochs:
        return empty("no epoch reported yet")
    # Validation and test accuracy where the trial reports them; stores from before
    # validation splits have only ``accuracy`` (the registry's label says which split).
    acc = [k for k in ("val_accuracy", "test_accuracy") if _series(epochs, k)[0]] or ["accuracy"]
    panels: list[tuple[str, list[tuple[str, str, str, str]]]] = [
        ("accuracy", [(k, objective_info(k).label, color, dash) for k, color, dash in
                      zip(acc, (ACCENT, "#0ea5e9"), ("solid", "dot"))]),
        ("loss", [("train_loss", "train loss", "#f59e0b", "solid"),
                  ("test_loss", "test loss", "#dc2626", "dot")]),
    ]
    if _series(epochs, "lts.frozen_fraction")[0]:
        panels.append(("frozen fraction (LTS)", [
            ("lts.frozen_fraction", "frozen fraction", "#8b5cf6", "solid"),
            ("lts.updates_eliminated", "updates eliminated (avg)", "#a78bfa", "dot")]))
    if _series(epochs, "tr.transition_rate")[0]:
        panels.append(("transition rate (TR)", [
            ("tr.transition_rate", "measured TR", "#10b981", "solid"),
            ("tr.target_rate", "target TR", "#111827", "dash")]))
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.1, vertical_spacing=0.16)
    for i, (_, series) in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        for key, label, color, dash in series:
            xs, ys = _series(epochs, key)
            if xs:
                fig.add_trace(go.Scatter(name=label, x=xs, y=ys, mode="lines+markers",
                                         line={"color": color, "dash": dash, "width": 2},
                                         marker={"size": 6}), row=row, col=col)
        fig.update_xaxes(title_text="epoch", dtick=1, row=row, col=col)
    fig = _style(fig, title, height=300 * nrows + 80)
    fig.update_layout(legend={"y": -0.25 / nrows})
    return fig
