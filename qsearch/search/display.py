"""Live terminal view of a running study: a trials table and a progress bar (rich)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
        self.progress = Progress(TextColumn(f"[bold]{study}[/]"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.progress.add_task("trials", total=total, completed=already)
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
                self.progress.update(self.task, completed=min(self.done, self.total))
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

    def _render(self) -> Group:
        from qsearch.config.objectives import label_of

        t = Table(title=f"study {self.study}", expand=False,
                  caption="; ".join(f"{o}: {label_of(o)}" for o in self.objectives))
        for c in ("#", "state", "epoch", *self.objectives, "params / error"):
            t.add_column(c, justify="right" if c not in ("state", "params / error") else "left")
        keys = self._keys()
        for n in sorted(self.rows)[-self.max_rows:]:
            r = self.rows[n]
            st = r.get("state", "RUNNING")
            t.add_row(str(n), f"[{_STYLE.get(st, '')}]{st}[/]", format_value(r.get("epoch")),
                      *(format_value(r.get(k, r.get(o))) for k, o in zip(keys, self.objectives)),
                      (r.get("error") or r.get("params") or "")[:70])
        return Group(t, self.progress)
