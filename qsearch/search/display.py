"""Live terminal view of a running study (rich).

Top to bottom: the progress bar (pinned first, so a tall table never pushes it off screen)
with elapsed time, ETA and the best value so far; the newest trials, as many as the terminal
has room for; and the trials on the current front with their full parameters (the trials
table truncates them to fit). The front here is the non-dominated set of the finished,
feasible, non-reused trials on the study's objectives; the store's snapshot is the record.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def format_value(v: Any) -> str:
    """A table cell: blank for None, 4 significant digits for floats (shared with the CLI)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class LiveDisplay:
    """Call :meth:`event` from the driver's callback; ``max_rows`` newest trials are shown."""

    def __init__(self, study: str, total: int, already: int, console: Console | None = None,
                 max_rows: int = 20, enabled: bool = True,
                 objectives: list[str] | None = None):
        self.study, self.total, self.max_rows = study, total, max_rows
        #: The study's objectives, as the columns (the caption says what each figure is).
        self.objectives = list(objectives or ["val_accuracy", "size_mb", "backward_flops"])
        self.rows: dict[int, dict[str, Any]] = {}
        self.done = already
        self.console = console
        self.progress = Progress(TextColumn(f"[bold]{study}[/]"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("elapsed"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[best]}"), console=console)
        self.task = self.progress.add_task("trials", total=total, completed=already, best="")
        self.live = Live(self._render(), console=console, refresh_per_second=4,
                         transient=False) if enabled else None
        self._last = 0.0

    def __enter__(self) -> LiveDisplay:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def event(self, kind: str, number: int, data: dict[str, Any]) -> None:
        row = self.rows.setdefault(number, {"state": "RUNNING", "epoch": 0})
        if kind == "start":
            row["params"] = ", ".join(f"{k}={format_value(v)}" for k, v in data["params"].items())
        elif kind == "epoch":
            row.update({k: data.get(k) for k in ("epoch", *self._keys())})
        elif kind == "retry":
            row.update(state=f"RETRY {data['retries']}", error=data.get("error"))
        elif kind == "end":
            row.update({k: v for k, v in data.items() if v is not None})
            if data.get("state") in ("COMPLETE", "PRUNED", "FAIL"):
                self.done += 1
                self.progress.update(self.task, completed=min(self.done, self.total),
                                     best=self.best_so_far())
        now = time.monotonic()
        if self.live and (kind != "epoch" or now - self._last > 0.25):
            self._last = now
            self.live.update(self._render())

    def _keys(self) -> list[str]:
        from qsearch.config.objectives import get_objective

        keys = []
        for name in self.objectives:
            try:
                keys.append(get_objective(name).metric_key)
            except KeyError:
                keys.append(name)
        return keys

    def _directions(self) -> list[str]:
        from qsearch.config.objectives import get_objective

        out = []
        for name in self.objectives:
            try:
                out.append(get_objective(name).direction)
            except KeyError:
                out.append("maximize")
        return out

    def _finished(self) -> dict[int, list[float]]:
        """Objective values of the trials that can be on a front: COMPLETE, feasible, not a
        reused duplicate, every objective present."""
        keys, out = self._keys(), {}
        for n, r in self.rows.items():
            if r.get("state") != "COMPLETE" or r.get("feasible") is False \
                    or r.get("reused_from") is not None:
                continue
            vals = [r.get(o, r.get(k)) for k, o in zip(keys, self.objectives)]
            if all(isinstance(v, (int, float)) for v in vals):
                out[n] = [float(v) for v in vals]
        return out

    def best_so_far(self) -> str:
        """``best <first objective> <value> (#trial)`` among the finished trials, or ''."""
        vals = self._finished()
        if not vals:
            return ""
        sign = 1.0 if self._directions()[0] == "maximize" else -1.0
        n = max(vals, key=lambda k: sign * vals[k][0])
        return f"best {self.objectives[0]} {format_value(vals[n][0])} (#{n})"

    def front(self) -> list[int]:
        """Trial numbers on the current non-dominated front, in order."""
        vals = self._finished()
        signs = [1.0 if d == "maximize" else -1.0 for d in self._directions()]
        g = {n: [s * x for s, x in zip(signs, v)] for n, v in vals.items()}

        def dominates(a: list[float], b: list[float]) -> bool:
            return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

        return sorted(n for n in g if not any(dominates(g[m], g[n]) for m in g if m != n))

    def _render(self) -> Group:
        from qsearch.config.objectives import label_of

        t = Table(title=f"study {self.study}", expand=False,
                  caption="; ".join(f"{o}: {label_of(o)}" for o in self.objectives))
        for c in ("#", "state", "epoch", *self.objectives, "params / error"):
            t.add_column(c, justify="right" if c not in ("state", "params / error") else "left",
                         no_wrap=c == "params / error", overflow="ellipsis")
        keys = self._keys()
        front = self.front()
        height = self.console.size.height if self.console is not None else 0
        # Room for the bar, the table's frame and caption, and the front lines.
        room = max(3, height - 8 - len(front)) if height else self.max_rows
        for n in sorted(self.rows)[-min(self.max_rows, room):]:
            r = self.rows[n]
            st = r.get("state", "RUNNING")
            t.add_row(str(n), f"[{_STYLE.get(st, '')}]{st}[/]", format_value(r.get("epoch")),
                      *(format_value(r.get(k, r.get(o))) for k, o in zip(keys, self.objectives)),
                      (r.get("error") or r.get("params") or "")[:70])
        lines = [f"#{n}: {self.rows[n].get('params') or '(base config)'}" for n in front]
        parts: list[Any] = [self.progress, t]
        if lines:
            parts.append(Text("front (full params):\n" + "\n".join(lines)))
        return Group(*parts)
