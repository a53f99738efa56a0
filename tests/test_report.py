"""``qsearch report``: one self-contained HTML file with the study's Pareto trials."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _dash_data import TINY_STUDY, ensure_tiny_study
from qsearch.cli import main
from qsearch.store import Store, queries

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_tiny_study(tmp_path_factory.getbasetemp() / "dash-study")


def _figure(html: str, div_id: str) -> dict:
    """The data passed to Plotly.newPlot for ``div_id`` in the report."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*(\[.*?\]),\s*\{', html,
                  re.DOTALL)
    assert m, f"no figure {div_id}"
    return json.loads(m.group(1))


def test_report_is_self_contained_and_lists_the_front(study_url: str, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["report", TINY_STUDY, "-o", str(out), "--storage", study_url]) == 0
    html = out.read_text()
    assert "<script src=" not in html and "<link" not in html  # nothing fetched
    assert html.count("plotly.js v") >= 1 and len(html) > 3_000_000  # plotly.js inlined once
    store = Store(study_url, create=False)
    _, front = queries.pareto_front(store, TINY_STUDY)
    rows = sorted(int(n) for n in re.findall(r"data-trial=(\d+)", html))
    assert rows == sorted(p["trial_number"] for p in front)
    pareto = next(t for t in _figure(html, "pareto-2d") if t.get("name") == "Pareto front")
    assert sorted(c[0] for c in pareto["customdata"]) == rows
    hv = _figure(html, "hypervolume")[0]["y"]
    assert hv == pytest.approx([s["hypervolume"] for s in queries.pareto_snapshots(store, TINY_STUDY)])
    pc = _figure(html, "parallel-coordinates")[0]
    assert pc["type"] == "parcoords" and "w_bits" in [d["label"] for d in pc["dimensions"]]
    store.dispose()


def test_report_errors_are_one_line(study_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", "nope", "-o", str(tmp_path / "r.html"), "--storage", study_url]) == 2
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and TINY_STUDY in err
    assert main(["report", TINY_STUDY, "-o", str(tmp_path / "r.txt"), "--storage", study_url]) == 2
    assert "-o/--output" in capsys.readouterr().err
    assert not (tmp_path / "r.txt").exists()
