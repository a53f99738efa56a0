"""The README's first command, as a new user runs it: ``qsearch launch studies/quickstart.yaml``
in an empty folder. It must finish, print only qsearch's own lines (library logs go to the
study's driver.log), and leave a front that means something: at least 4 distinct configs
spanning a visible accuracy range."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_LINE = re.compile(r"\b(INFO|WARNING|DEBUG|Warning|FutureWarning|DeprecationWarning)\b|"
                          r"\(pid=\d+\)|optuna|ray\.|tune\.py|Token authentication")


@pytest.mark.slow
def test_quickstart_prints_only_its_own_lines_and_finds_a_real_front(tmp_path):
    env = {**os.environ, "QSEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("QSEARCH_STORAGE", None)
    run = subprocess.run([sys.executable, "-m", "qsearch", "launch",
                          str(ROOT / "studies" / "quickstart.yaml"), "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    noisy = [ln for ln in lines if LIBRARY_LINE.search(ln)]
    assert noisy == [], noisy
    assert any(ln.startswith("study quickstart: finished") for ln in lines), lines
    assert (tmp_path / "qsearch_artifacts" / "quickstart" / "driver.log").stat().st_size > 0

    front = subprocess.run([sys.executable, "-m", "qsearch", "pareto", "quickstart",
                            "--format", "json"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert front.returncode == 0, front.stderr
    points = json.loads(front.stdout)["points"]
    configs = {json.dumps(p["params"], sort_keys=True) for p in points}
    assert len(points) >= 4 and len(configs) == len(points), points
    accs = [p["val_accuracy"] for p in points]
    assert max(accs) - min(accs) >= 0.03, accs
