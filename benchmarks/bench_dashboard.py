"""Page load time of the study dashboard on a 1,000-trial study (synthetic trials written with
Optuna's API + qsearch's tables), against a 10-trial study for the ratio.

"Page load" over HTTP = GET the page + the routing callback (server-built layout with the
Pareto, 3-D and hypervolume figures and the Pareto table) + the parallel-coordinates
callback, i.e. everything the browser waits for. With ``--browser`` it also times headless
Chromium until the Pareto points and the parcoords are drawn.

    python benchmarks/bench_dashboard.py [--trials 1000] [--repeat 5] [--browser]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sys

import requests

from dashboards import create_app

# The synthetic-study writer is test code (it goes through the store's bulk import API).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _dash_data import serve_in_thread, write_synthetic_study  # noqa: E402


def _post(base: str, deps: list, prefix: str, values: dict) -> int:
    d = next(x for x in deps if x["output"].lstrip(".").startswith(prefix))
    outs = [o.rsplit(".", 1) for o in d["output"].strip(".").split("...")]
    outputs = [{"id": i, "property": p} for i, p in outs]
    fill = lambda xs: [{**x, "value": values.get(f"{x['id']}.{x['property']}")} for x in xs]
    inputs = fill(d["inputs"])
    body = {"output": d["output"], "outputs": outputs if d["output"].startswith("..") else outputs[0],
            "inputs": inputs, "state": fill(d["state"]),
            "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
    r = requests.post(f"{base}/_dash-update-component", json=body, timeout=120)
    r.raise_for_status()
    return len(r.content)


def http_load(base: str, study: str) -> tuple[float, float, int]:
    """(seconds to the first paint = page + routing callback, seconds to all figures, bytes)."""
    t0 = time.perf_counter()
    requests.get(f"{base}/study/{study}", timeout=60).raise_for_status()
    deps = requests.get(f"{base}/_dash-dependencies", timeout=60).json()
    n = _post(base, deps, "page.children", {"url.pathname": f"/study/{study}"})
    first = time.perf_counter() - t0
    n += _post(base, deps, "parcoords.figure", {"study-name.data": study,
                                                "parcoords-objective.value": "accuracy"})
    return first, time.perf_counter() - t0, n


def browser_load(base: str, study: str) -> float:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp()
    opts = webdriver.ChromeOptions()
    for f in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", "--window-size=1500,1800"]:
        opts.add_argument(f)
    opts.binary_location = "/usr/bin/chromium"
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        drv.get(f"{base}/")  # warm the JS bundles, as a returning user would have them
        WebDriverWait(drv, 60).until(ec.presence_of_element_located((By.ID, "studies-content")))
        t0 = time.perf_counter()
        drv.get(f"{base}/study/{study}")
        wait = WebDriverWait(drv, 120)
        wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "#pareto-2d .scatterlayer .trace:nth-of-type(2) .point")))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#parcoords .parcoords")))
        return time.perf_counter() - t0
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--browser", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        t = time.perf_counter()
        write_synthetic_study(url, "small", 10, seed=1)
        write_synthetic_study(url, "large", args.trials, seed=0)
        print(f"wrote synthetic studies (10 and {args.trials} trials) in "
              f"{time.perf_counter() - t:.1f} s")
        with serve_in_thread(create_app(url)) as base:
            results = {}
            for study in ("small", "large"):
                http_load(base, study)  # warm-up (imports, caches)
                runs = [http_load(base, study) for _ in range(args.repeat)]
                results[study] = (statistics.median(r[0] for r in runs),
                                  statistics.median(r[1] for r in runs), runs[0][2])
                print(f"{study:>5}: first paint {results[study][0] * 1000:7.0f} ms, all figures "
                      f"{results[study][1] * 1000:7.0f} ms, {results[study][2] / 1e6:.2f} MB "
                      f"of callback JSON (median of {args.repeat})")
            print(f"ratio {args.trials} / 10 trials: first paint "
                  f"{results['large'][0] / results['small'][0]:.1f}x, all figures "
                  f"{results['large'][1] / results['small'][1]:.1f}x")
            if args.browser:
                b_small = statistics.median(browser_load(base, "small") for _ in range(3))
                b_large = statistics.median(browser_load(base, "large") for _ in range(3))
                print(f"browser (headless Chromium, until Pareto points + parcoords drawn): "
                      f"10 trials {b_small:.2f} s, {args.trials} trials {b_large:.2f} s, "
                      f"ratio {b_large / b_small:.1f}x")


if __name__ == "__main__":
    main()
