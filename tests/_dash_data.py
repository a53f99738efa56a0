"""Helpers for the dashboard's tests and benchmark (like ``dash.testing``, but small); test
code, not shipped in the wheel. No SQL here: synthetic data goes in through the store's API.

* :func:`serve_in_thread` runs an app on a free localhost port in a background thread.
* :func:`tiny_spec` / :func:`launch_command` describe a real, tiny study (digits/tiny-cnn,
  2 epochs) that ``qsearch launch`` runs in a subprocess — the dashboard can poll it while
  the driver writes.
* :func:`write_synthetic_study` fills a database with N synthetic trials through Optuna's API
  and :meth:`qsearch.store.Store.import_trials`, for measuring page load on a large study
  without training.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import event

TINY_STUDY = "dash-tiny"


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a Dash app (its Flask server) on a free port; yields the base URL."""
    from werkzeug.serving import make_server

    server = make_server(host, 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="dash-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def tiny_spec(storage: str, name: str = TINY_STUDY, num_trials: int = 4, epochs: int = 2
              ) -> dict[str, Any]:
    """A study that finishes in about a minute on two CPU cores: LTS on or off (so some
    trials are uniform-precision baselines), bits and LR searched, TR on in one arm."""
    return {
        "version": 1, "name": name, "storage": storage, "model": "tiny-cnn", "dataset": "digits",
        "base": {"epochs": epochs, "batch_size": 64, "device": "cpu",
                 "warm_start": {"epochs": 2}},
        "objectives": ["accuracy", "size_mb", "backward_cost"],
        "budget": {"num_trials": num_trials, "max_concurrent": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "sampler": {"type": "random", "seed": 3},
        "scheduler": {"type": "none"},
        "artifacts": {"keep": "pareto"},
        "search_space": {
            "w_bits": {"type": "categorical", "choices": [2, 4, 8]},
            "a_bits": {"type": "categorical", "choices": [2, 4, 8]},
            "lr": {"type": "float", "low": 0.01, "high": 0.08, "log": True},
            "methods.lts.enabled": {"type": "categorical", "choices": [True, False]},
            "methods.tr.enabled": {"type": "categorical", "choices": [True, False]},
        },
    }


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def launch_command(spec_path: Path, num_cpus: int = 2) -> list[str]:
    """``qsearch launch`` through the running interpreter (no reliance on PATH)."""
    return [sys.executable, "-c", "from qsearch.cli import entry; entry()", "launch",
            str(spec_path), "--num-cpus", str(num_cpus), "--quiet"]


# --------------------------------------------------------------------------- synthetic


_LAYERS = [("stage1.0", "conv", 288, 18432), ("stage2.0.0", "conv", 18432, 1179648),
           ("stage3.0", "conv", 36864, 589824), ("fc", "linear", 640, 640)]


def _synthetic_trial(rng: random.Random, number: int) -> dict[str, Any]:
    w, a = rng.choice([2, 3, 4, 8]), rng.choice([2, 3, 4, 8])
    lts = rng.random() < 0.6
    lr = 10 ** rng.uniform(-2.3, -1)
    frozen = rng.uniform(0.2, 0.9) if lts else 0.0
    layers = []
    for i, (name, kind, params, macs) in enumerate(_LAYERS):
        edge = i in (0, len(_LAYERS) - 1)
        layers.append({"name": name, "kind": kind, "params": params, "macs": macs,
                       "w_bits": 8 if edge else w, "a_bits": 8 if edge else a, "g_bits": 32,
                       "frozen_fraction": max(0.0, min(1.0, frozen + rng.uniform(-0.1, 0.1)))
                       if lts else 0.0})
    size = sum(p * lay["w_bits"] for lay, (_, _, p, _) in zip(layers, _LAYERS)) / 8e6 + 0.001
    fwd = sum(m * lay["w_bits"] * lay["a_bits"] for lay, (_, _, _, m) in zip(layers, _LAYERS))
    fp = sum(m * 32 * 32 * 2 for _, _, _, m in _LAYERS)
    bwd = sum(m * 32 * (lay["w_bits"] + lay["a_bits"] * (1 - lay["frozen_fraction"]))
              for lay, (_, _, _, m) in zip(layers, _LAYERS)) / fp
    acc = 0.99 - 0.12 / w - 0.08 / a - 0.02 * frozen + rng.gauss(0, 0.006)
    config = {"model": "tiny-cnn", "dataset": "digits", "epochs": 3, "w_bits": w, "a_bits": a,
              "lr": lr, "first_bits": 8, "last_bits": 8, "layers": {},
              "methods": {"lts": {"enabled": lts, "mode": "linear-growth"},
                          "tr": {"enabled": False}, "gradq": {"enabled": False},
                          "csq": {"enabled": False}, "blockrep": {"enabled": False}}}
    return {"params": {"w_bits": w, "a_bits": a, "lr": lr, "methods.lts.enabled": lts},
            "config": config, "layers": layers, "accuracy": min(0.999, acc), "size_mb": size,
            "backward_cost": bwd, "bops": float(fwd), "frozen": frozen}


def _fast_sqlite(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA synchronous=OFF")


def write_synthetic_study(url: str, name: str, n_trials: int, seed: int = 0,
                          epochs: int = 3) -> None:
    """A finished study of ``n_trials`` synthetic trials (about 5% pruned, 2% failed): Optuna
    trials via ``study.add_trials``; qsearch's rows (trials with their values by name, epochs,
    layers, one Pareto snapshot per COMPLETE trial, as the driver writes them) through
    :meth:`~qsearch.store.Store.import_trials`, in one transaction."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from qsearch.search.front import compute_front
    from qsearch.search.pareto import default_reference
    from qsearch.store import Store, utcnow

    objectives = ["accuracy", "size_mb", "backward_cost"]
    directions = ["maximize", "minimize", "minimize"]
    rng = random.Random(seed)
    dists = {"w_bits": CategoricalDistribution([2, 3, 4, 8]),
             "a_bits": CategoricalDistribution([2, 3, 4, 8]),
             "lr": FloatDistribution(0.005, 0.1, log=True),
             "methods.lts.enabled": CategoricalDistribution([True, False])}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    if storage.engine.dialect.name == "sqlite":  # synthetic data: no fsync per trial
        storage.engine.dispose()
        event.listen(storage.engine, "connect", _fast_sqlite)
    study = optuna.create_study(study_name=name, storage=storage, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is "experimental"
        study.set_metric_names(objectives)
    store = Store(url)
    rec, _ = store.create_or_get_study(
        name, spec_yaml=f"name: {name}\n# synthetic\n", spec_hash="synthetic",
        search_hash="synthetic", objectives=objectives, directions=directions,
        artifacts_dir="/nonexistent")
    t0 = utcnow() - timedelta(hours=n_trials / 60)
    frozen_trials, trials, snapshots = [], [], []
    complete: list[dict[str, Any]] = []
    front_rows: list[dict[str, Any]] = []
    for n in range(n_trials):
        tr = _synthetic_trial(rng, n)
        roll = rng.random()
        state = "FAIL" if roll < 0.02 else "PRUNED" if roll < 0.07 else "COMPLETE"
        done = state == "COMPLETE"
        n_epochs = epochs if done else 1
        start, end = t0 + timedelta(minutes=n), t0 + timedelta(minutes=n, seconds=50)
        frozen_trials.append(create_trial(
            state=getattr(TrialState, state), params=tr["params"], distributions=dists,
            values=[tr[o] for o in objectives] if done else None,
            user_attrs={"qsearch_counted": True}))
        epoch_reports = []
        for e in range(1, n_epochs + 1):
            f = e / epochs
            epoch_reports.append({"epoch": e, "accuracy": tr["accuracy"] - 0.05 * (1 - f),
                                  "train_loss": 0.4 - 0.25 * f, "test_loss": 0.42 - 0.24 * f,
                                  "size_mb": tr["size_mb"], "backward_cost": tr["backward_cost"],
                                  "lts.frozen_fraction": tr["frozen"] * f})
        trials.append({
            "number": n, "state": state, "counted": True, "params": tr["params"],
            "config": tr["config"], "epochs_completed": n_epochs, "max_epochs": epochs,
            "detail": {"COMPLETE": "finished", "PRUNED": "pruned by asha",
                       "FAIL": "synthetic"}[state],
            "error": "synthetic failure" if state == "FAIL" else None,
            "started_at": start, "finished_at": end, "epochs": epoch_reports,
            "values": {k: tr[k] for k in (*objectives, "bops")} if done else None,
            "layers": tr["layers"] if done else []})
        if done:
            complete.append({"number": n, **{o: tr[o] for o in objectives}})
            # The front of all COMPLETE trials is the front of (previous front + new trial),
            # against the reference point of all values: same result as the driver's
            # compute_front(complete), without an O(n) recomputation per trial.
            ref = default_reference([[r[o] for o in objectives] for r in complete], objectives,
                                    directions)
            front = compute_front(front_rows + [complete[-1]], objectives, directions,
                                  dict(zip(objectives, ref)))
            on_front = {p["trial_number"] for p in front["points"]}
            front_rows = [r for r in complete[-1:] + front_rows if r["number"] in on_front]
            snapshots.append({"trigger_trial": n, "n_complete": len(complete),
                              "hypervolume": front["hypervolume"],
                              "reference_point": front["reference_point"], "created_at": end,
                              "points": front["points"]})
    study.add_trials(frozen_trials)
    store.import_trials(rec.id, trials, snapshots)
    store.set_status(rec.id, "finished", finished=True)
    store.dispose()


def tiny_study_paths(base_dir: Path) -> tuple[Path, str, Path]:
    """(spec path, storage URL, done-marker) of the shared tiny study under ``base_dir``."""
    base_dir.mkdir(parents=True, exist_ok=True)
    db = base_dir / "study.db"
    return base_dir / "spec.yaml", f"sqlite:///{db}", base_dir / "launched.ok"


def ensure_tiny_study(base_dir: Path, timeout_s: float = 900) -> str:
    """Launch the tiny study once under ``base_dir`` (reused by later callers); its URL."""
    import subprocess

    spec_path, url, done = tiny_study_paths(base_dir)
    if done.exists():
        return url
    write_spec(spec_path, tiny_spec(url))
    proc = subprocess.run(launch_command(spec_path), cwd=base_dir, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny study launch failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done.write_text(proc.stdout)
    return url
