"""Plotly figures built from plain data (lists of dicts from :mod:`dashboards.data`).

Nothing here reads the database, so the dashboard, the HTML report and the tests build the
same figures from the same rows. Every point that stands for a trial carries the trial
number as ``customdata[0]``: clicking it opens that trial, and tests compare it to the store.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.data import OBJECTIVE_LABELS

FONT = "Inter, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
COLORSCALE = "Viridis"
FRONT_LINE = "#1f2937"
ACCENT = "#2563eb"
BITS_COLORS = {"w_bits": "#2563eb", "a_bits": "#f59e0b", "g_bits": "#10b981"}
HOVER = ("<b>trial %{customdata[0]}</b><br>accuracy %{customdata[1]:.4f}<br>"
         "size %{customdata[2]:.4g} MB<br>backward cost %{customdata[3]:.4g}"
         "<br>%{customdata[4]}<extra></extra>")


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


def _custom(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[int(r["number"]), r["accuracy"], r["size_mb"], r["backward_cost"],
             r.get("tag") or ""] for r in rows]


def _tag(t: dict[str, Any]) -> str:
    parts = []
    if t.get("is_knee"):
        parts.append("knee")
    if t.get("on_front"):
        parts.append("Pareto")
    if t.get("baseline"):
        parts.append(f"baseline {t['baseline']}")
    return ", ".join(parts)


def _split(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(front rows from the stored snapshot, dominated COMPLETE rows, baseline rows)."""
    by_number = {int(t["number"]): t for t in trials}
    front_rows = []
    for p in front:
        t = by_number.get(int(p["trial_number"]), {})
        row = {"number": int(p["trial_number"]), "accuracy": p["accuracy"],
               "size_mb": p["size_mb"], "backward_cost": p["backward_cost"],
               "is_knee": bool(p.get("is_knee")), "on_front": True,
               "baseline": t.get("baseline")}
        row["tag"] = _tag(row)
        front_rows.append(row)
    on_front = {r["number"] for r in front_rows}
    complete = [t for t in trials if t["state"] == "COMPLETE" and t.get("accuracy") is not None
                and t.get("size_mb") is not None and t.get("backward_cost") is not None]
    dominated = [{**t, "tag": _tag(t)} for t in complete if int(t["number"]) not in on_front]
    # One marker per bit-width pair: the best (most accurate, then smallest) plain-LSQ run
    # at that precision, i.e. the baseline a mixed-precision or method point has to beat.
    best: dict[str, dict[str, Any]] = {}
    for r in front_rows + dominated:
        lab = r.get("baseline")
        if lab and (lab not in best or (r["accuracy"], -r["size_mb"]) >
                    (best[lab]["accuracy"], -best[lab]["size_mb"])):
            best[lab] = r
    baselines = sorted(best.values(), key=lambda r: r["size_mb"])
    return front_rows, dominated, baselines


def _color_range(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    vals = [float(r["backward_cost"]) for r in rows]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    return (lo, hi) if hi > lo else (lo - 0.05, hi + 0.05)


def pareto_2d(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              title: str | None = "Pareto front: accuracy vs size") -> go.Figure:
    """Accuracy vs model size, every COMPLETE trial coloured by backward cost; dominated
    trials faded, the stored Pareto front solid and outlined, baselines as labelled diamonds,
    the knee as a star."""
    front_rows, dominated, baselines = _split(trials, front)
    if not front_rows and not dominated:
        return empty("no completed trial yet", height=460)
    cmin, cmax = _color_range(front_rows + dominated)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        name="dominated", x=[t["size_mb"] for t in dominated],
        y=[t["accuracy"] for t in dominated], mode="markers", customdata=_custom(dominated),
        hovertemplate=HOVER, marker={"size": 8, "opacity": 0.28, "color":
                                     [t["backward_cost"] for t in dominated],
                                     "coloraxis": "coloraxis", "line": {"width": 0}}))
    ordered = sorted(front_rows, key=lambda r: (r["size_mb"], r["accuracy"]))
    fig.add_trace(go.Scatter(
        name="Pareto front", x=[r["size_mb"] for r in ordered],
        y=[r["accuracy"] for r in ordered], mode="markers", customdata=_custom(ordered),
        hovertemplate=HOVER, marker={"size": 13, "color": [r["backward_cost"] for r in ordered],
                                     "coloraxis": "coloraxis",
                                     "line": {"width": 1.5, "color": FRONT_LINE}}))
    knee = [r for r in ordered if r["is_knee"]]
    if knee:
        fig.add_trace(go.Scatter(
            name="knee", x=[knee[0]["size_mb"]], y=[knee[0]["accuracy"]], mode="markers",
            customdata=_custom(knee), hovertemplate=HOVER,
            marker={"symbol": "star", "size": 20, "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": "#dc2626"}}))
    if baselines:
        fig.add_trace(go.Scatter(
            name="uniform-precision baseline", x=[b["size_mb"] for b in baselines],
            y=[b["accuracy"] for b in baselines], mode="markers+text",
            text=[b["baseline"] for b in baselines], textposition="top center",
            textfont={"size": 10, "color": "#374151"}, customdata=_custom(baselines),
            hovertemplate=HOVER, marker={"symbol": "diamond-open", "size": 16,
                                         "line": {"width": 2, "color": "#111827"}}))
    fig.update_layout(coloraxis={"colorscale": COLORSCALE, "cmin": cmin, "cmax": cmax,
                                 "colorbar": {"title": {"text": "backward<br>cost"},
                                              "thickness": 14}},
                      clickmode="event", hovermode="closest")
    fig.update_xaxes(title_text=OBJECTIVE_LABELS["size_mb"])
    fig.update_yaxes(title_text=OBJECTIVE_LABELS["accuracy"])
    return _style(fig, title, height=460)


def pareto_3d(trials: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              title: str | None = "3-D view: accuracy, size, backward cost") -> go.Figure:
    front_rows, dominated, baselines = _split(trials, front)
    if not front_rows and not dominated:
        return empty("no completed trial yet", height=460)
    cmin, cmax = _color_range(front_rows + dominated)
    fig = go.Figure()

    def add(name: str, rows: list[dict[str, Any]], marker: dict[str, Any], **kw: Any) -> None:
        fig.add_trace(go.Scatter3d(
            name=name, x=[r["size_mb"] for r in rows], y=[r["backward_cost"] for r in rows],
            z=[r["accuracy"] for r in rows], customdata=_custom(rows), hovertemplate=HOVER,
            marker=marker, **kw))

    add("dominated", dominated, {"size": 4, "opacity": 0.25, "coloraxis": "coloraxis",
                                 "color": [t["backward_cost"] for t in dominated]},
        mode="markers")
    add("Pareto front", front_rows, {"size": 7, "coloraxis": "coloraxis",
                                     "color": [r["backward_cost"] for r in front_rows],
                                     "line": {"width": 1, "color": FRONT_LINE}}, mode="markers")
    if baselines:
        add("uniform-precision baseline", baselines,
            {"symbol": "diamond-open", "size": 8, "color": "#111827"}, mode="markers+text",
            text=[b["baseline"] for b in baselines], textfont={"size": 10})
    fig.update_layout(
        coloraxis={"colorscale": COLORSCALE, "cmin": cmin, "cmax": cmax,
                   "colorbar": {"title": {"text": "backward<br>cost"}, "thickness": 14}},
        scene={"xaxis_title": "size (MB)", "yaxis_title": "backward cost",
               "zaxis_title": "accuracy", "camera": {"eye": {"x": 1.6, "y": -1.6, "z": 0.9}}})
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


def parallel_coordinates(trials: Sequence[dict[str, Any]], objective: str, direction: str,
                         objectives: Sequence[str] = ("accuracy", "size_mb", "backward_cost"),
                         title: str | None = "Searched parameters") -> go.Figure:
    """Plotly's parcoords over the searched params of every COMPLETE trial, then the
    objectives, coloured by ``objective`` (brush an axis to filter).

    Why not ``optuna.visualization.plot_parallel_coordinate``: Optuna 5 draws one Scatter
    trace per trial, which is slow to send and render at 1,000 trials; one ``Parcoords``
    trace (WebGL) stays fast and is interactive.
    """
    rows = [t for t in trials if t["state"] == "COMPLETE" and t.get(objective) is not None]
    if not rows:
        return empty("no completed trial yet")
    keys: list[str] = []
    for t in rows:
        for k in (t.get("params") or {}):
            if k not in keys:
                keys.append(k)
    dims = [_dimension(k, [(t.get("params") or {}).get(k) for t in rows]) for k in keys]
    dims += [{"label": OBJECTIVE_LABELS.get(o, o), "values": [t[o] for t in rows]}
             for o in objectives if all(t.get(o) is not None for t in rows)]
    color = [t[objective] for t in rows]
    scale = COLORSCALE if direction == "maximize" else COLORSCALE + "_r"
    fig = go.Figure(go.Parcoords(
        line={"color": color, "colorscale": scale, "showscale": True,
              "colorbar": {"title": {"text": OBJECTIVE_LABELS.get(objective, objective)},
                           "thickness": 14}},
        dimensions=dims, labelangle=-20, labelside="top",
        customdata=[int(t["number"]) for t in rows]))
    fig = _style(fig, title, height=420)
    fig.update_layout(margin={"l": 50, "r": 40, "t": 110, "b": 30})
    return fig


def layer_bits(layers: Sequence[dict[str, Any]], title: str | None = "Per-layer bit-widths"
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


def frozen_fractions(layers: Sequence[dict[str, Any]],
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
    """Accuracy, loss, LTS frozen fraction and TR measured-vs-target transition rate, one
    panel each; method panels appear only when the trial reported those metrics."""
    if not epochs:
        return empty("no epoch reported yet")
    panels: list[tuple[str, list[tuple[str, str, str, str]]]] = [
        ("accuracy", [("accuracy", "test accuracy", ACCENT, "solid")]),
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
