"""Headless Chromium against the served dashboard: open a study, click a Pareto point, see
that trial's per-layer chart; open the HTML report with the network blocked.

Chromium comes from the Debian packages ``chromium`` and ``chromium-driver``; the session
fixture installs them when /usr/bin/chromium is missing (so CI runs this, never skips it).
Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from dashboards import create_app, write_report
from _dash_data import TINY_STUDY, ensure_tiny_study, serve_in_thread
from qsearch.store import Store, queries

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1500,1800"]


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        cmd = ["apt-get", "install", "-y", "chromium", "chromium-driver"]
        if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True, capture_output=True)
            subprocess.run(cmd, check=True, capture_output=True)
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
    return CHROMIUM


def _driver(extra: list[str] = ()) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qsearch-chromium-")
    opts = webdriver.ChromeOptions()
    for f in [*FLAGS, *extra, f"--user-data-dir={profile}"]:
        opts.add_argument(f)
    opts.binary_location = CHROMIUM
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv._qsearch_profile = profile
    return drv


def _quit(drv: Any) -> None:
    drv.quit()
    shutil.rmtree(drv._qsearch_profile, ignore_errors=True)


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_tiny_study(tmp_path_factory.getbasetemp() / "dash-study")


def test_click_pareto_point_opens_trial(chromium: str, study_url: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    store = Store(study_url, create=False)
    front = {p["trial_number"] for p in queries.pareto_front(store, TINY_STUDY)[1]}
    ARTIFACTS.mkdir(exist_ok=True)
    drv = _driver()
    try:
        with serve_in_thread(create_app(study_url)) as base:
            drv.get(f"{base}/study/{TINY_STUDY}")
            wait = WebDriverWait(drv, 60)
            # trace 0 = dominated, trace 1 = the Pareto front
            sel = "#pareto-2d .scatterlayer .trace:nth-of-type(2) .point"
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, sel)))
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#parcoords .parcoords")))
            drv.save_screenshot(str(ARTIFACTS / "dashboard-study.png"))
            point = drv.find_elements(By.CSS_SELECTOR, sel)[0]
            ActionChains(drv).move_to_element(point).pause(0.3).click().perform()
            wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, "#layer-bits .barlayer .point")))
            title = drv.find_element(By.CSS_SELECTOR, "#trial-header h2").text
            number = int(title.removeprefix("Trial #"))
            assert number in front
            assert drv.current_url.endswith(f"/study/{TINY_STUDY}/trial/{number}")
            layers = queries.layer_records(store, TINY_STUDY, number)
            # Plotly may redraw the figure (a resize) while we read it: a stale element is
            # read again, not a failure.
            settled = WebDriverWait(drv, 30, ignored_exceptions=(StaleElementReferenceException,))

            def drawn(d: Any) -> tuple[int, int, list[str]]:
                bars = d.find_elements(By.CSS_SELECTOR, "#layer-bits .barlayer .trace")
                points = len(bars[0].find_elements(By.CSS_SELECTOR, ".point")) if bars else 0
                ticks = [x.text for x in d.find_elements(By.CSS_SELECTOR, "#layer-bits .xtick text")]
                return len(bars), points, ticks

            want = (3, len(layers), [r.name for r in layers])  # weights, activations, gradients
            try:
                settled.until(lambda d: drawn(d) == want)
            except TimeoutException:
                assert drawn(drv) == want
            drv.execute_script("window.scrollTo(0, 0)")
            drv.save_screenshot(str(ARTIFACTS / "dashboard-trial.png"))
    finally:
        _quit(drv)
        store.dispose()
    assert (ARTIFACTS / "dashboard-trial.png").stat().st_size > 10_000


def test_report_renders_without_network(chromium: str, study_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = write_report(TINY_STUDY, tmp_path / "report.html", study_url)
    # every request that would leave the machine goes to a closed port
    drv = _driver(["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"])
    try:
        drv.get(out.as_uri())
        WebDriverWait(drv, 60).until(lambda d: d.execute_script(
            "return window.Plotly !== undefined && "
            "document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4"))
        rows = drv.find_elements(By.CSS_SELECTOR, "#pareto-table tr.pareto-row")
        shown = sorted(int(r.get_attribute("data-trial")) for r in rows)
        drv.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        _quit(drv)
    store = Store(study_url, create=False)
    assert shown == sorted(p["trial_number"] for p in queries.pareto_front(store, TINY_STUDY)[1])
    store.dispose()
