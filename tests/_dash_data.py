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


# --------------------------------------------------------------------------- feature study

FEATURE_STUDY = "dash-features"
FEATURE_OBJECTIVES = ["val_accuracy", "size_mb", "backward_flops"]
# (w_bits, a_bits, LTS) of the trained COMPLETE trials 0..7. LTS makes the executed FLOPs
# smaller but the measured CPU time larger, so the front differs per training-cost axis.
_FEATURE_CONFIGS = [(2, 2, False), (2, 4, True), (3, 4, False), (4, 4, True), (4, 8, False),
                    (8, 8, True), (3, 2, True), (8, 4, False)]
FEATURE_KINDS = {"complete": list(range(8)), "infeasible": 8, "reused": (9, 1), "pruned": 10,
                 "failed": 11, "failed_early": 12, "repeats": 3, "max_epochs": 3}


def _feature_values(w: int, a: int, lts: bool) -> dict[str, float]:
    return {"val_accuracy": 0.70 + 0.02 * w + 0.01 * a - 0.02 * lts,
            "test_accuracy": 0.69 + 0.02 * w + 0.01 * a - 0.02 * lts,
            "size_mb": 0.005 * w + 0.001,
            "backward_flops": 1.0 - 0.35 * lts - 0.01 * a,
            "backward_time": 0.002 * (1 + 0.1 * a) * (1.2 if lts else 1.0),
            "backward_bops": (w + a) / 64 * (0.6 if lts else 1.0)}


def _feature_config(w: int, a: int, lts: bool) -> dict[str, Any]:
    return {"model": "tiny-cnn", "dataset": "digits", "epochs": 3, "w_bits": w, "a_bits": a,
            "layers": {}, "methods": {"lts": {"enabled": lts}}}


def _epoch(e: int, vals: dict[str, float], final: dict[str, float] | None = None
           ) -> dict[str, Any]:
    f = e / 3
    m = {"epoch": e, "train_loss": 0.5 - 0.1 * e, "val_loss": 0.5 - 0.1 * e,
         "val_accuracy": vals["val_accuracy"] - 0.05 * (1 - f), "size_mb": vals["size_mb"],
         "backward_flops": vals["backward_flops"], "backward_time": vals["backward_time"],
         "backward_bops": vals["backward_bops"]}
    return {**m, **(final or {})}


def write_feature_study(url: str, name: str = FEATURE_STUDY,
                        sensitivity_cache: Path | None = None) -> dict[str, Any]:
    """A small finished study with every kind of trial the dashboards tell apart, written
    through the driver's own write path (``trial_started`` / ``record_epoch`` /
    ``trial_finished`` / ``update_snapshot``) and Optuna's API, without training:

    * 8 COMPLETE trials of a ``repeats: 3`` study: the final report carries each objective's
      spread over the seeds (``<metric>.std``, as :func:`repeat_summary` writes it);
    * trial 8 COMPLETE but infeasible (the best accuracy: it would be on the front);
    * trial 9 a reused result of trial 1 (same config, not trained);
    * trial 10 PRUNED after epoch 1 of 3, trial 11 FAIL after epoch 2, trial 12 FAIL before
      its first epoch.

    All three training costs are stored for every COMPLETE trial. With
    ``sensitivity_cache`` the driver's :func:`enqueue_sensitivity_seeds` runs for real on
    tiny-cnn/digits (1-epoch warm start cached there) and keeps its profile on the study."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from qsearch.search.front import update_snapshot
    from qsearch.store import Store

    directions = ["maximize", "minimize", "minimize"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.set_metric_names(FEATURE_OBJECTIVES)
    store = Store(url)
    spec_yaml = (f"name: {name}\nrepeats: 3\nconstraints: {{size_mb: {{max: 0.05}}}}\n"
                 "# written by tests/_dash_data.py:write_feature_study\n")
    rec, _ = store.create_or_get_study(
        name, spec_yaml=spec_yaml, spec_hash="f" * 64, search_hash="f" * 64,
        objectives=FEATURE_OBJECTIVES, directions=directions, artifacts_dir="/nonexistent")
    dists = {"w_bits": CategoricalDistribution([2, 3, 4, 8]),
             "a_bits": CategoricalDistribution([2, 4, 8]),
             "methods.lts.enabled": CategoricalDistribution([True, False])}
    rows: list[tuple[int, str, tuple[int, int, bool], dict[str, float]]] = []
    for n, cfg in enumerate(_FEATURE_CONFIGS):
        rows.append((n, "COMPLETE", cfg, _feature_values(*cfg)))
    rows.append((8, "INFEASIBLE", (8, 8, False), {**_feature_values(8, 8, False),
                                                 "val_accuracy": 0.99, "size_mb": 0.06,
                                                 "backward_flops": 0.3, "backward_time": 0.001,
                                                 "backward_bops": 0.1}))
    rows.append((9, "REUSED", _FEATURE_CONFIGS[1], _feature_values(*_FEATURE_CONFIGS[1])))
    rows.append((10, "PRUNED", (2, 8, False), _feature_values(2, 8, False)))
    rows.append((11, "FAIL", (3, 8, True), _feature_values(3, 8, True)))
    rows.append((12, "FAIL_EARLY", (4, 2, False), _feature_values(4, 2, False)))
    frozen = []
    for n, kind, (w, a, lts), vals in rows:
        params = {"w_bits": w, "a_bits": a, "methods.lts.enabled": lts}
        state = {"INFEASIBLE": "COMPLETE", "REUSED": "COMPLETE", "FAIL_EARLY": "FAIL"}.get(kind, kind)
        done = state == "COMPLETE"
        frozen.append(create_trial(
            state=getattr(TrialState, state), params=params, distributions=dists,
            values=[vals[o] for o in FEATURE_OBJECTIVES] if done else None))
        store.trial_started(rec.id, n, optuna_trial_id=None, params=params,
                            config=_feature_config(w, a, lts), max_epochs=3)
        epochs = {"COMPLETE": 3, "INFEASIBLE": 3, "PRUNED": 1, "FAIL": 2}.get(kind, 0)
        spread = {"val_accuracy.std": 0.004 + 0.001 * n, "backward_time.std": 0.0002,
                  "size_mb.std": 0.0, "backward_flops.std": 0.0, "repeats": 3}
        for e in range(1, epochs + 1):
            store.record_epoch(rec.id, n, _epoch(e, vals, spread if done and e == 3 else None))
        store.trial_finished(
            rec.id, n, state=state, counted=kind != "REUSED",
            detail={"PRUNED": "pruned by pareto at epoch 1", "FAIL": "trial error",
                    "FAIL_EARLY": "trial error", "REUSED": "reused trial 1",
                    "INFEASIBLE": "finished; infeasible"}.get(kind, "finished"),
            values=vals if done else None, epochs_completed=epochs,
            error={"FAIL": "RuntimeError: loss became NaN at epoch 2",
                   "FAIL_EARLY": "ValueError: synthetic failure before the first epoch"}.get(kind),
            layers=[{"name": ln, "kind": k, "params": p, "macs": m, "w_bits": w, "a_bits": a}
                    for ln, k, p, m in _LAYERS] if done and kind != "REUSED" else None,
            feasible=False if kind == "INFEASIBLE" else None,
            reused_from=1 if kind == "REUSED" else None)
        if done:
            update_snapshot(store, rec.id, FEATURE_OBJECTIVES, directions, trigger_trial=n)
    study.add_trials(frozen)
    if sensitivity_cache is not None:
        _record_sensitivity(study, name, sensitivity_cache)
    store.set_status(rec.id, "finished", finished=True)
    store.dispose()
    return FEATURE_KINDS


def _record_sensitivity(study: Any, name: str, cache: Path) -> None:
    """The driver's sensitivity step, for real (tiny-cnn on digits, CPU)."""
    from qsearch.config import parse_study_spec
    from qsearch.search.driver import enqueue_sensitivity_seeds
    from qsearch.search.expand import expand_search_space

    spec = expand_search_space(parse_study_spec({
        "name": name, "model": "tiny-cnn", "dataset": "digits",
        "base": {"epochs": 1, "device": "cpu", "num_threads": 1,
                 "warm_start": {"epochs": 1, "cache_dir": str(cache)}},
        "objectives": FEATURE_OBJECTIVES, "sampler": {"sensitivity": True},
        "search_space": {"layers.*.w_bits": {"type": "int", "low": 2, "high": 8}}}))
    enqueue_sensitivity_seeds(spec, study)
