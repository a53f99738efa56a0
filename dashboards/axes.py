"""Axis words and extents shared by every figure of the dashboard and the report.

Why a module: the registry's labels can be long (``backward bit-operations on low-precision
training hardware; not executed here``). Unwrapped, such a title runs into the colour bar,
the legend or the other axis; a 3-D scene sized by Plotly's autorange cuts markers at its
walls. Every figure titles its axes through :func:`title` (label, unit and kind, wrapped)
and sizes them through :func:`padded_range`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qsearch.store import ObjectiveInfo

#: The three training-cost objectives every trial records (executed, measured, modelled): a
#: front can be re-drawn on any of them from stored values.
COSTS = ("backward_flops", "backward_time", "backward_bops")
WRAP = 34


def wrap(text: str, width: int = WRAP) -> str:
    """``text`` broken into lines of at most ``width`` characters (``<br>``), at spaces."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def title(o: ObjectiveInfo, width: int = WRAP) -> str:
    """``label (unit, kind)`` wrapped: what the number is, in what unit, how it was got."""
    return wrap(o.axis_title, width)


def compact(o: ObjectiveInfo) -> str:
    """``name (unit, kind)``: for axes with little room (parallel coordinates, the 3-D
    scene, whose titles are clipped at the figure's edge); the hover text has the label."""
    inner = ", ".join(p for p in (o.unit, o.kind) if p)
    return f"{o.name} ({inner})" if inner else o.name


def padded_range(values: Iterable[Any], frac: float = 0.08) -> list[float] | None:
    """[lo, hi] around ``values`` with ``frac`` of the span (or of the value) on each side,
    so no marker sits on a wall; None when there is no number."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    lo, hi = min(nums), max(nums)
    pad = (hi - lo) * frac or abs(hi) * frac or 1.0
    return [lo - pad, hi + pad]


def cost_of(objectives: Iterable[str]) -> str | None:
    """The training-cost objective among ``objectives`` (the first), or None."""
    return next((o for o in objectives if o in COSTS or _resolved(o) in COSTS), None)


def with_cost(objectives: list[str], cost: str | None) -> list[str]:
    """``objectives`` with its training-cost objective replaced by ``cost``; unchanged for
    None. A study without one gets ``cost`` third, where the plots show it (colour, the 3-D
    view's depth), its other objectives after it."""
    if not cost:
        return list(objectives)
    current = cost_of(objectives)
    if current is None:
        return [*objectives[:2], cost, *objectives[2:]]
    return [cost if o == current else o for o in objectives]


def _resolved(name: str) -> str:
    from qsearch.config.objectives import resolve_name

    return resolve_name(name)
