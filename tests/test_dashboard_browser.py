"""Headless Chromium against the served dashboard: open a study, click a Pareto point, see
that trial's per-layer chart; open the HTML report with the network blocked. On a study
with pruned, failed, infeasible and reused trials (tests/_dash_data.py:write_feature_study):
they are drawn and listed, a pruned trial's page says it was pruned and at which epoch, no
two axis titles, legends, colour bars or tick labels overlap (dashboard and report), and the
not-found page shows no internal URL or path.

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
from _dash_data import FEATURE_STUDY, TINY_STUDY, ensure_tiny_study, serve_in_thread, \
    write_feature_study
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


# --------------------------------------------------------------------------- feature study


@pytest.fixture(scope="module")
def feature(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("browser-features")
    url = f"sqlite:///{base / 'features.db'}"
    write_feature_study(url, sensitivity_cache=base / "cache")
    with serve_in_thread(create_app(url)) as http:
        yield {"url": url, "db": str(base / "features.db"), "base": http}


#: Every piece of text a Plotly figure lays out around its plot; no two may overlap.
_BOXES_JS = """
const root = document.querySelector(arguments[0] + '.js-plotly-plot, ' + arguments[0] +
                                    ' .js-plotly-plot');
if (!root) return null;
const out = [];
for (const sel of ['.g-xtitle', '.g-ytitle', '.g-gtitle', '.legend', '.colorbar',
                   '.xaxislayer-above', '.yaxislayer-above', '.parcoords .axis-title',
                   '.parcoords .axis .tick text', '.parcoords .axis-extent-top',
                   '.parcoords .axis-extent-bottom']) {
  root.querySelectorAll(sel).forEach((el, i) => {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0)
      out.push({what: sel + '#' + i, l: r.left, t: r.top, r: r.right, b: r.bottom});
  });
}
root.querySelectorAll('.xtick text, .ytick text').forEach((el, i) => {
  const r = el.getBoundingClientRect();
  if (r.width > 0 && el.textContent)
    out.push({what: 'tick ' + el.textContent, tick: el.closest('.xtick') ? 'x' : 'y',
              l: r.left, t: r.top, r: r.right, b: r.bottom});
});
return out;
"""


def _overlaps(boxes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of laid-out texts whose boxes intersect by more than 2 px each way (a group
    and the tick labels inside it are not compared: an axis layer holds its ticks)."""
    def cut(a: dict, b: dict) -> bool:
        return min(a["r"], b["r"]) - max(a["l"], b["l"]) > 2 and \
            min(a["b"], b["b"]) - max(a["t"], b["t"]) > 2

    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.get("tick") and b["what"].startswith(f".{a['tick']}axislayer"):
                continue
            if b.get("tick") and a["what"].startswith(f".{b['tick']}axislayer"):
                continue
            if cut(a, b):
                out.append((a["what"], b["what"]))
    return out


def _wait_drawn(drv: Any, selector: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, 60).until(lambda d: d.execute_script(
        "const g = document.querySelector(arguments[0] + '.js-plotly-plot, ' + arguments[0] +"
        " ' .js-plotly-plot'); return g && g.querySelector('.main-svg') !== null && "
        "g._fullLayout !== undefined", selector))
    drv.execute_script("return new Promise(r => setTimeout(r, 600))")  # let Plotly settle


def _figure_data(drv: Any, selector: str) -> list[dict[str, Any]]:
    """The traces Plotly drew: ``gd.data`` of the graph div (Plotly's public figure)."""
    return drv.execute_script(
        "const g = document.querySelector(arguments[0] + ' .js-plotly-plot');"
        "return g.data.map(t => ({name: t.name, numbers: (t.customdata || []).map(c => c[0])}))",
        selector)


def test_study_shows_pruned_and_failed_trials(chromium: str, feature: Any) -> None:
    from selenium.webdriver.common.by import By

    drv = _driver()
    try:
        drv.get(f"{feature['base']}/study/{FEATURE_STUDY}")
        _wait_drawn(drv, "#pareto-2d")
        traces = {t["name"]: t["numbers"] for t in _figure_data(drv, "#pareto-2d")}
        legend = [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#pareto-2d .legendtext")]
        drawn = drv.execute_script(
            "return [...document.querySelectorAll('#pareto-2d .scatterlayer .trace')]"
            ".map(t => t.querySelectorAll('.point').length)")
        others = drv.find_element(By.ID, "other-trials").text
        ARTIFACTS.mkdir(exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "dashboard-features.png"))
    finally:
        _quit(drv)
    assert traces["pruned (at its last rung)"] == [10]
    assert traces["failed (at its last epoch)"] == [11]
    assert "pruned (at its last rung)" in legend and "failed (at its last epoch)" in legend
    assert "infeasible (violates a constraint)" in legend
    assert "reused result (duplicate config)" in legend
    names = list(traces)
    assert drawn[names.index("pruned (at its last rung)")] == 1
    assert drawn[names.index("failed (at its last epoch)")] == 1
    assert "PRUNED at epoch 1 of 3" in others and "FAILED at epoch 2 of 3" in others
    assert "FAILED before its first epoch" in others


def test_pruned_trial_page_shows_state_and_last_rung(chromium: str, feature: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    drv = _driver()
    try:
        drv.get(f"{feature['base']}/study/{FEATURE_STUDY}")
        wait = WebDriverWait(drv, 60)
        link = wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, f"#other-trials a[href$='/trial/10']")))
        link.click()
        wait.until(lambda d: "Trial #10" in d.find_element(By.ID, "page").text)
        _wait_drawn(drv, "#layer-bits")
        head = drv.find_element(By.ID, "trial-header").text
        body = drv.find_element(By.TAG_NAME, "body").text
        drv.save_screenshot(str(ARTIFACTS / "dashboard-pruned-trial.png"))
    finally:
        _quit(drv)
    assert "PRUNED at epoch 1 of 3 (its last rung)" in head
    assert "at epoch 1" in head  # its values are those of that rung, labelled so
    assert "not finished" not in body
    assert "pruned at epoch 1 of 3" in body  # why it has no per-layer record


def test_axis_labels_never_overlap(chromium: str, feature: Any, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    study_figs = ["#pareto-2d", "#hv-history", "#parcoords", "#sensitivity", "#importance"]
    trial_figs = ["#layer-bits", "#layer-frozen", "#epoch-curves"]
    found: dict[str, list] = {}
    drv = _driver()
    try:
        for cost in ("backward_flops", "backward_bops"):  # bops has the longest label
            drv.get(f"{feature['base']}/study/{FEATURE_STUDY}")
            if cost != "backward_flops":  # the cost dropdown, set through Dash's clientside API
                _wait_drawn(drv, "#pareto-2d")
                drv.execute_script("window.dash_clientside.set_props('front-cost', "
                                   "{value: arguments[0]})", cost)
                WebDriverWait(drv, 60).until(lambda d: d.execute_script(
                    "return document.querySelector('#pareto-2d .js-plotly-plot')"
                    ".layout.coloraxis.colorbar.title.text.includes('BOPs')"))
            for sel in study_figs:
                _wait_drawn(drv, sel)
                found[f"{cost} {sel}"] = drv.execute_script(_BOXES_JS, sel)
            ARTIFACTS.mkdir(exist_ok=True)
            drv.save_screenshot(str(ARTIFACTS / f"dashboard-axes-{cost}.png"))
        drv.get(f"{feature['base']}/study/{FEATURE_STUDY}/trial/5")
        for sel in trial_figs:
            _wait_drawn(drv, sel)
            found[sel] = drv.execute_script(_BOXES_JS, sel)
        from dashboards import write_report

        out = write_report(FEATURE_STUDY, tmp_path / "report.html", feature["url"])
        drv.get(out.as_uri())
        for sel in ("#pareto-2d", "#hypervolume", "#parallel-coordinates", "#sensitivity",
                    "#importance"):
            _wait_drawn(drv, sel)
            found[f"report {sel}"] = drv.execute_script(_BOXES_JS, sel)
    finally:
        _quit(drv)
    assert all(found.values()), {k: v for k, v in found.items() if not v}
    bops = " ".join(b["what"] for b in found["backward_bops #pareto-2d"])
    assert ".colorbar" in bops and ".g-xtitle" in bops and ".legend" in bops
    bad = {k: _overlaps(v) for k, v in found.items() if _overlaps(v)}
    assert not bad, bad


def test_not_found_page_shows_no_internal_url(chromium: str, feature: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = _driver()
    try:
        drv.get(f"{feature['base']}/no/such/page?token=abc")
        WebDriverWait(drv, 60).until(
            lambda d: "Page not found" in d.find_element(By.TAG_NAME, "body").text)
        body = drv.find_element(By.TAG_NAME, "body").text
        source = drv.page_source
    finally:
        _quit(drv)
    host = feature["base"].removeprefix("http://")
    for secret in ("/no/such/page", "token", host, feature["db"], "sqlite", "127.0.0.1"):
        assert secret not in body, secret
    assert feature["db"] not in source and "sqlite" not in source
