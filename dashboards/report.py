"""``qsearch report``: one self-contained HTML file for a study.

plotly.js is inlined once (``include_plotlyjs=True`` on the first figure, later figures reuse
it) and the CSS is embedded, so the file opens with no network: e-mail it, attach it to a
paper review, open it on an air-gapped cluster login node.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dashboards import axes, data, figures
from dashboards.figures_params import parallel_coordinates
from dashboards.readonly import Source, open_source
from qsearch.errors import ConfigError

_CSS = """
body{font-family:Inter,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;
background:#f4f6fa;color:#111827;font-size:14px}
header{background:#0f172a;color:#e2e8f0;padding:16px 28px}
header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#94a3b8;font-size:12px}
main{padding:20px 28px;max-width:1500px;margin:0 auto}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:14px 16px;
margin-bottom:16px}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:16px}
.stat{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:8px 14px}
.stat b{display:block;font-size:17px}.stat span{font-size:11px;color:#6b7280;
text-transform:uppercase}
table{width:100%;border-collapse:collapse;font-size:13px}
th{text-align:left;background:#f9fafb;border-bottom:1px solid #e5e7eb;padding:8px 10px}
td{border-bottom:1px solid #f1f5f9;padding:7px 10px}td.num,th.num{text-align:right}
code{font-size:12px}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _table(view: data.StudyView) -> str:
    from dashboards.pages.study import column_titles, front_rows

    names, rows = front_rows(view)
    titles = column_titles(names, view.record.objectives)
    head = ("<tr><th>trial</th>" + "".join(f"<th class=num>{html.escape(t)}</th>"
                                           for t in titles) + "<th>params</th><th>note</th></tr>")
    out = []
    for r in rows:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        cells = "".join(f"<td class=num>{_fmt(v)}</td>" for v in r["values"])
        out.append(f"<tr class=pareto-row data-trial={int(r['trial_number'])}>"
                   f"<td>#{int(r['trial_number'])}</td>{cells}<td><code>{html.escape(params)}"
                   f"</code></td><td>{html.escape(r['note'])}</td></tr>")
    return f"<table id=pareto-table>{head}{''.join(out)}</table>"


def _cost_line(view: data.StudyView) -> str:
    """Which training-cost axis the front uses, with unit and kind (and that the other two
    are stored: ``qsearch pareto --objectives`` or the dashboard re-draw on them)."""
    cost = axes.cost_of(o.name for o in view.objectives)
    if cost is None:
        return ("training-cost axis: none (the study optimized no training cost; every "
                "trial still stores " + ", ".join(axes.COSTS) + ")")
    info = next(o for o in view.objectives if o.name == cost)
    others = [c for c in axes.COSTS if c != cost]
    return (f"training-cost axis: {info.axis_title}; the front can be re-drawn on "
            f"{' or '.join(others)} from stored values (qsearch pareto --objectives, or the "
            "dashboard's training-cost axis)")


def render_report(src: Source, study: str) -> str:
    """The report's HTML text."""
    from dashboards.pages.study import insight_figures

    view = data.study_view(src, study)
    sens, imp = insight_figures(src, view)
    figs = [("pareto-2d", figures.pareto_2d(view.trials, view.front, view.objectives)),
            ("pareto-3d", figures.pareto_3d(view.trials, view.front, view.objectives)),
            ("hypervolume", figures.hypervolume_history(view.snapshots)),
            ("parallel-coordinates", parallel_coordinates(
                view.trials, view.objectives[0], view.objectives)),
            ("sensitivity", sens), ("importance", imp)]
    parts = []
    for i, (div_id, fig) in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=div_id,
                                 config={"displaylogo": False, "responsive": True}))
    n = view.counts
    hv = view.snapshot.hypervolume if view.snapshot else None
    stats = "".join(f"<div class=stat><span>{k}</span><b>{_fmt(v)}</b></div>" for k, v in (
        ("status", view.record.status), ("finished", n.get("COMPLETE", 0)),
        ("running", n.get("RUNNING", 0)), ("pruned", n.get("PRUNED", 0)),
        ("failed", n.get("FAIL", 0)), ("Pareto trials", len(view.front)), ("hypervolume", hv)))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = html.escape(f"qsearch report: {study}")
    grid1 = f"<div class=grid><div class=card>{parts[0]}</div><div class=card>{parts[1]}</div></div>"
    rest = "".join(f"<div class=card>{p}</div>" for p in parts[2:])
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{title}</h1>"
            f"<p>objectives {html.escape(', '.join(f'{o.axis_title} {o.arrow}' for o in view.objectives))} · "
            f"{html.escape(src.masked_url)} · generated {when}</p></header><main>"
            f"<p class=axes id=cost-axis>{html.escape(_cost_line(view))}</p>"
            f"<div class=stats>{stats}</div>{grid1}{rest}"
            f"<div class=card><h3>Pareto trials</h3>{_table(view)}</div></main></body></html>")


def write_report(study: str, out: str | Path, storage: str | Source | None = None) -> Path:
    """Write the report of ``study`` to ``out`` (an .html path); returns the path."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError("-o/--output", f"the report is HTML; name it *.html (got {out.name})")
    src = storage if isinstance(storage, Source) else open_source(storage)
    try:
        text = render_report(src, study)
    finally:
        if not isinstance(storage, Source):
            src.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
