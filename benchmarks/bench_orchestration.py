"""Orchestration overhead of the search service, and Pareto-front speed at scale.

1. N identical tiny trials (digits/tiny-cnn, 1 epoch, warm start cached beforehand) run
   (a) directly in a Python loop through ``qsearch.train.train`` and (b) as a qsearch study
   (Ray Tune + Optuna + store, one trial at a time, scheduler off). Every study trial has a
   distinct config (a repeated config reuses the earlier result instead of training, which
   made earlier steady-state figures look ~10x too good). The study's wall time includes
   Ray's start-up (``launch`` starts Ray itself) and the first trial's worker start-up.
   Prints the per-trial overhead all in, the steady state (median gap between trial ends)
   and the time from ``launch`` to the first trial's start.

   Measured 2026-12-03, 2 shared CPU cores (load 1-2.5 from other users; figures vary by
   +-30 % run to run), ``python benchmarks/bench_orchestration.py --trials 8 --skip-pareto``:

   ==============================  ==============  ================================
   (issue #19 goals)               before          after (lazy imports, Ray start
                                   (b1e53ca)       overlapping the Optuna storage)
   ==============================  ==============  ================================
   all in (goal <= 0.5 s/trial)    2.44-3.07       2.15-2.55 s/trial overhead
   steady (goal <= 0.05 s/trial)   0.18            0.18-0.19 s/trial overhead
   launch -> first trial started   9.2-16.3 s      8.1-11.4 s
   first trial incl. worker start  18.6-26.2 s     16.1-19.6 s
   ==============================  ==============  ================================

   Neither goal is met. Where the first ~16 s go: Ray start-up 2.4-4.7 s; Tune's setup and
   the trial actor's start ~2.4 s; torch + Ray Tune imports in the worker ~2-3 s; the first
   train() ~4.5-5 s, nearly all of it torch.compile of the fused LSQ kernels (importing
   dynamo/inductor ~2.5 s, tracing 2 graphs ~1 s; the direct loop pays this in its untimed
   warm-up call). With Ray 2.60 here, a trial actor never got a worker that had run a task,
   and a ``worker_process_setup_hook`` stopped Ray prestarting workers, so the imports
   could not be done ahead of the trial through public APIs.
   The last line splits the steady state into a trial's own span (Tune's start to its end as
   the driver records them, the worker's training inside) and the gap between trials.
   2026-12-04, three runs each way, alternating (before = ab04f07 via ``PYTHONPATH``): with
   every trial's training on the worker's one long-lived thread (``search/training_thread.py``)
   the span fell from 0.45-0.47 to 0.35-0.36 s (direct loop 0.28-0.30 s), the steady-state
   overhead from 0.19-0.21 to 0.09-0.11 s/trial and all-in from 1.56-1.88 to 1.38-1.62
   s/trial; the gap between trials stayed 0.03-0.04 s. Both goals stay unmet.
2. A store holding 10,000 synthetic COMPLETE trials: time the query of their objective
   values plus the front/hypervolume/knee computation (goal: < 0.5 s), and the full
   snapshot write the driver does after each trial.

    python benchmarks/bench_orchestration.py [--trials 8] [--synthetic 10000] [--skip-pareto]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def bench_overhead(n: int, workdir: Path) -> None:
    from qsearch.search import launch
    from qsearch.config import parse_trial_config
    from qsearch.config import parse_study_spec
    from qsearch.store import Store, queries, utcnow
    from qsearch.train import train

    import torch

    torch.set_num_threads(1)  # what each qsearch trial gets (resources.cpu = 1)
    base = {"epochs": 1, "device": "cpu", "batch_size": 128, "warm_start": {"epochs": 2}}
    cfg = parse_trial_config({**base, "w_bits": 4, "lr": 0.01})
    train(cfg)  # warm start into the cache, so neither side pays for it
    t = time.perf_counter()
    for _ in range(n):
        train(cfg)
    direct = time.perf_counter() - t

    spec = parse_study_spec({
        "name": "bench", "storage": f"sqlite:///{workdir / 'bench.db'}", "base": base,
        "budget": {"num_trials": n, "max_concurrent": 1}, "resources": {"cpu": 1},
        "sampler": {"type": "random", "seed": 0}, "scheduler": {"type": "none"},
        # Every trial a distinct config (a repeated one would reuse the earlier result, not
        # train), all of the same cost as the direct loop's: lr differs in the 7th digit.
        "search_space": {"w_bits": 4, "lr": {"type": "float", "low": 0.01, "high": 0.0100001}},
        "artifacts": {"dir": str(workdir / "art")},
    })
    t = time.perf_counter()
    wall0 = utcnow()
    res = launch(spec, display=False)  # starts Ray itself: its start-up is part of the figure
    study = time.perf_counter() - t
    assert res.complete == n, res
    per = (study - direct) / n
    # Steady state: time between consecutive trial ends once the worker is up (the first
    # trial also pays for starting the Ray worker process and importing torch there).
    store = Store(spec.storage, create=False)
    rows = queries.trials(store, "bench")
    store.dispose()
    assert all(r.reused_from is None for r in rows), "a trial was not trained"
    ends = sorted(r.finished_at for r in rows)
    first_start = min(r.started_at for r in rows)
    gaps = sorted((b - a).total_seconds() for a, b in zip(ends, ends[1:], strict=False))
    steady = gaps[len(gaps) // 2] if gaps else float("nan")
    # The steady state split in two: a trial's own span as the driver saw it (Tune's start to
    # its end, the worker's training inside) and the rest of the gap (Optuna, store, Tune).
    spans = sorted((r.finished_at - r.started_at).total_seconds()
                   for r in sorted(rows, key=lambda r: r.started_at)[1:])
    span = spans[len(spans) // 2] if spans else float("nan")
    print(f"trials: {n}   direct loop: {direct:.2f} s ({direct / n:.2f} s/trial)")
    print(f"qsearch study incl. Ray start-up: {study:.2f} s ({study / n:.2f} s/trial); "
          f"launch -> first trial started: {(first_start - wall0).total_seconds():.2f} s")
    print(f"per-trial overhead, all in: {per:.2f} s   ratio qsearch/direct: {study / direct:.2f}x")
    print(f"steady state (median gap between trial ends): {steady:.2f} s/trial -> overhead "
          f"{steady - direct / n:.2f} s/trial, ratio {steady / (direct / n):.2f}x; "
          f"first trial incl. worker start-up: {study - sum(gaps):.2f} s")
    print(f"  of the steady state (measured): a trial's own span (median, after the first) "
          f"{span:.2f} s "
          f"vs {direct / n:.2f} s direct; between trials {steady - span:.2f} s")


def bench_pareto(n: int, workdir: Path) -> None:
    import numpy as np

    from qsearch.search.front import compute_front, update_snapshot
    from qsearch.store import Store, queries, utcnow

    store = Store(f"sqlite:///{workdir / 'pareto.db'}")
    rec, _ = store.create_or_get_study(
        "synthetic", spec_yaml="", spec_hash="0" * 64, search_hash="0" * 64,
        objectives=["accuracy", "size_mb", "backward_cost"],
        directions=["maximize", "minimize", "minimize"], artifacts_dir=str(workdir))
    rng = np.random.default_rng(0)
    size = rng.uniform(0.01, 0.1, n)
    acc = 1 - 0.02 / size * rng.uniform(0.01, 0.05, n)  # a trade-off, so the front is non-trivial
    bwd = rng.uniform(0.05, 1.0, n)
    now = utcnow()
    store.import_trials(rec.id, [
        {"number": i, "state": "COMPLETE", "counted": True, "epochs_completed": 1,
         "started_at": now, "values": {"accuracy": float(acc[i]), "size_mb": float(size[i]),
                                       "backward_cost": float(bwd[i])}} for i in range(n)])
    objs, dirs = ["accuracy", "size_mb", "backward_cost"], ["maximize", "minimize", "minimize"]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        rows = queries.complete_values(store, rec.id)
        front = compute_front(rows, objs, dirs)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    update_snapshot(store, rec.id, objs, dirs, trigger_trial=n - 1)
    snap = time.perf_counter() - t
    best = min(times)
    print(f"pareto over {n} stored trials: query+front+hypervolume+knee {best:.3f} s "
          f"(median {sorted(times)[2]:.3f} s; goal < 0.5 s -> {'OK' if best < 0.5 else 'SLOW'}), "
          f"front size {len(front['points'])}, snapshot write incl. query {snap:.3f} s")
    store.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--synthetic", type=int, default=10_000)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-pareto", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qsearch-bench-") as d:
        workdir = Path(d)
        os.environ.setdefault("QSEARCH_CACHE", str(workdir / "cache"))
        if not args.skip_pareto:
            bench_pareto(args.synthetic, workdir)
        if not args.skip_overhead:
            bench_overhead(args.trials, workdir)


if __name__ == "__main__":
    main()
