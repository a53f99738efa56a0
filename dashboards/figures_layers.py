"""Per-layer and per-epoch figures: a trial's bit-widths, frozen fractions and learning
curves, and a study's per-layer Hessian sensitivity. Plain data in, Plotly figures out.

A figure with nothing to draw says why (``empty``): a PRUNED or FAIL trial has no per-layer
record because those are written when a trial finishes, and the message says that instead
of a bare "not finished".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import axes
from dashboards.figures import ACCENT, _style, empty
from qsearch.store import objective_info

BITS_COLORS = {"w_bits": "#2563eb", "a_bits": "#f59e0b", "g_bits": "#10b981"}
NO_LAYERS = "no per-layer record (the trial has not finished)"
#: The y-axis words of each epoch-curve panel: unit and kind.
PANEL_UNITS = {"accuracy": "top-1 (measured)", "loss": "cross-entropy (measured)",
               "frozen fraction (LTS)": "share of weights (executed)",
               "transition rate (TR)": "share of weights (measured)"}


def _layer_axis(fig: go.Figure, n: int) -> None:
    """Layer names as categories; slanted once there are more than a few, so that long
    names (``features.17.conv.0.0``) never run into each other."""
    fig.update_xaxes(title_text="layer", type="category", automargin=True,
                     tickangle=-35 if n > 4 else 0)


def layer_bits(layers: Sequence[Any], title: str | None = "Per-layer bit-widths",
               why: str | None = None) -> go.Figure:
    if not layers:
        return empty(why or NO_LAYERS)
    names = [r["name"] for r in layers]
    fig = go.Figure()
    for key, label in (("w_bits", "weights"), ("a_bits", "activations"), ("g_bits", "gradients")):
        fig.add_trace(go.Bar(name=label, x=names, y=[r[key] for r in layers],
                             marker_color=BITS_COLORS[key], text=[r[key] for r in layers],
                             textposition="outside", cliponaxis=False,
                             hovertemplate=f"%{{x}}<br>{label}: %{{y}} bits<extra></extra>"))
    top = max(max(r[k] for k in BITS_COLORS) for r in layers)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="bit-width (bits, computed from the config)",
                     range=[0, top * 1.18])
    _layer_axis(fig, len(names))
    return _style(fig, title, height=380)


def frozen_fractions(layers: Sequence[Any],
                     title: str | None = "Frozen fraction per layer (time-averaged)",
                     why: str | None = None) -> go.Figure:
    if not layers:
        return empty(why or NO_LAYERS)
    names = [r["name"] for r in layers]
    vals = [float(r.get("frozen_fraction") or 0.0) for r in layers]
    fig = go.Figure(go.Bar(x=names, y=vals, marker_color="#8b5cf6",
                           text=[f"{v:.0%}" for v in vals], textposition="outside",
                           cliponaxis=False, customdata=[[r["params"], r["macs"]] for r in layers],
                           hovertemplate="%{x}<br>frozen %{y:.1%}<br>%{customdata[0]} weights, "
                                         "%{customdata[1]} MACs<extra></extra>"))
    fig.update_yaxes(title_text=axes.wrap("frozen fraction (% of the layer's weights, "
                                          "executed: LTS skipped their updates)", 40),
                     range=[0, 1.12], tickformat=".0%")
    _layer_axis(fig, len(names))
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
        fig.update_yaxes(title_text=PANEL_UNITS.get(panels[i][0], ""), row=row, col=col)
    fig = _style(fig, title, height=300 * nrows + 80)
    fig.update_layout(margin={"t": 110})
    return fig


def sensitivity_bars(record: dict[str, Any] | None,
                     title: str | None = "Per-layer sensitivity of the warm-started model"
                     ) -> go.Figure:
    """One bar per quantizable layer: ``max(tr H_l, 0) * mean(W_l^2)`` (the loss increase per
    unit of relative weight-noise power, :mod:`qsearch.search.sensitivity`), with the
    Hutchinson estimate's standard error; a log axis when the layers span > 2 decades."""
    layers = (record or {}).get("layers") or []
    if not layers:
        return empty("no per-layer sensitivity recorded for this study (it is computed when "
                     "sampler.sensitivity is on; qsearch space SPEC --sensitivity prints it)")
    names = [r["layer"] for r in layers]
    vals = [float(r["sensitivity"]) for r in layers]
    se = [float(r.get("trace_std") or 0.0) * float(r.get("mean_sq_weight") or 0.0) for r in layers]
    fig = go.Figure(go.Bar(
        name="sensitivity", x=names, y=vals, marker_color="#0ea5e9",
        error_y={"type": "data", "array": se, "visible": True, "thickness": 1.2},
        customdata=[[r["trace"], r.get("trace_std"), r["n_params"], r["mean_sq_weight"]]
                    for r in layers],
        hovertemplate="%{x}<br>sensitivity %{y:.4g}<br>tr(H) %{customdata[0]:.4g} ± "
                      "%{customdata[1]:.2g}<br>%{customdata[2]} weights, mean W² "
                      "%{customdata[3]:.3g}<extra></extra>"))
    pos = [x for x in vals if x > 0]
    log = len(pos) == len(vals) and max(pos) / min(pos) > 100
    probes, batches = record.get("probes"), record.get("batches")
    fig.update_yaxes(type="log" if log else "linear", title_text=axes.wrap(
        f"sensitivity max(tr H, 0)·mean(W²) (loss per unit relative weight-noise power; "
        f"measured: Hutchinson, {probes} probes × {batches} batches)", 42))
    _layer_axis(fig, len(names))
    return _style(fig, title, height=400)
