"""Does the search earn its name? Random search vs the spec's sampler vs sensitivity seeds.

On one fixed per-layer spec (``studies/perlayer-digits.yaml``: tiny-cnn on digits, one
``layers.*.w_bits`` dimension per layer), three samplers get the same trial budget, each
with ``--seeds`` sampler seeds:

* ``random``     — Optuna's RandomSampler;
* ``default``    — the spec's sampler (NSGA-II);
* ``sensitivity``— the spec's sampler with the HAWQ-style seeds of
  :func:`qsearch.search.sensitivity.seed_configs` enqueued first (``sampler.sensitivity``);
  the time the sensitivity took is charged to its compute at the start.

Everything runs in this process through Optuna's ask/tell and :func:`qsearch.train.train`
(no Ray, no database): :func:`run_inprocess` is the loop, reusable for any spec (the
quickstart check below uses it too). Trials are deterministic (fixed trial seed), so a config
trained once is not trained again: its result and its *measured* seconds are reused
(``--no-memo`` turns that off). The FP32 warm start is cached and shared by all samplers, and
not charged to any of them.

Printed: hypervolume (reference point from the spec) after every trial and against
cumulative compute seconds, mean over seeds; and the ratio "compute to reach random search's
final hypervolume" (mean over seeds of the compute at which a sampler's HV first reaches
random's mean final HV, divided by random's mean total compute; goal <= 0.33). Writes a
Plotly HTML of the curves.

    python benchmarks/bench_search.py [--trials 20] [--seeds 3] [--out bench_search.html]
    python benchmarks/bench_search.py --quickstart   # 16 in-process trials of the quickstart
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qsearch.config import StudySpec, load_study_spec  # noqa: E402
from qsearch.config.objectives import get_objective  # noqa: E402
from qsearch.search.expand import expand_search_space  # noqa: E402
from qsearch.search.pareto import hypervolume, pareto_front_mask  # noqa: E402

SAMPLERS = ("random", "default", "sensitivity")
RANDOM_SEED_OFFSET = 1000


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    values: list[float]
    seconds: float  # training wall time (measured when the config was first trained)
    reused: bool = False


@dataclass
class RunResult:
    sampler: str
    seed: int | None
    trials: list[TrialRecord]
    overhead_s: float = 0.0  # compute spent before the first trial (sensitivity)
    seeds_enqueued: list[dict[str, Any]] = field(default_factory=list)

    def values(self) -> np.ndarray:
        return np.array([t.values for t in self.trials], dtype=float)

    def compute(self) -> np.ndarray:
        """Cumulative compute seconds after each trial."""
        return self.overhead_s + np.cumsum([t.seconds for t in self.trials])


_MEMO: dict[str, tuple[list[float], float]] = {}


def train_values(spec: StudySpec, params: dict[str, Any], memo: bool = True
                 ) -> tuple[list[float], float, bool]:
    """Train the trial ``params`` of ``spec``; (objective values, seconds, reused)."""
    from qsearch.train import train

    cfg = spec.trial_config(params)
    key = cfg.content_hash() + json.dumps(list(spec.objectives))
    if memo and key in _MEMO:
        vals, secs = _MEMO[key]
        return list(vals), secs, True
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = train(cfg)
    secs = time.perf_counter() - t0
    vals = [float(r.metrics[get_objective(o).metric_key]) for o in spec.objectives]
    if memo:
        _MEMO[key] = (vals, secs)
    return vals, secs, False


def run_inprocess(spec: StudySpec, n_trials: int, sampler: Any = None,
                  enqueue: list[dict[str, Any]] | None = None, memo: bool = True,
                  on_trial: Callable[[TrialRecord], None] | None = None) -> list[TrialRecord]:
    """Run ``n_trials`` of ``spec`` in this process: Optuna ask/tell over the (expanded)
    spec's space with ``sampler`` (default: the spec's, :func:`build_sampler`), each trial
    trained by :func:`qsearch.train.train`. ``enqueue``: fixed params tried first."""
    import optuna

    from qsearch.search.space import build_sampler, optuna_space

    spec = expand_search_space(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(spec.directions),
                                sampler=sampler or build_sampler(spec))
    for params in enqueue or []:
        study.enqueue_trial(params)
    space = optuna_space(spec)
    out: list[TrialRecord] = []
    for _ in range(n_trials):
        ot = study.ask(space)
        vals, secs, reused = train_values(spec, dict(ot.params), memo)
        study.tell(ot, vals)
        rec = TrialRecord(ot.number, dict(ot.params), vals, secs, reused)
        out.append(rec)
        if on_trial:
            on_trial(rec)
    return out


def front_of(records: list[TrialRecord], directions: list[str]) -> list[TrialRecord]:
    if not records:
        return []
    mask = pareto_front_mask(np.array([r.values for r in records]), directions)
    return [r for r, m in zip(records, mask) if m]


def reference(spec: StudySpec) -> list[float]:
    missing = [o for o in spec.objectives if o not in spec.reference_point]
    if missing:
        raise SystemExit(f"the benchmark spec needs reference_point for {', '.join(missing)}")
    return [spec.reference_point[o] for o in spec.objectives]


def hv_curve(run: RunResult, directions: list[str], ref: list[float]) -> np.ndarray:
    v = run.values()
    return np.array([hypervolume(v[: i + 1], directions, ref) for i in range(len(v))])


def run_sampler(spec: StudySpec, name: str, seed: int, n_trials: int, memo: bool,
                log: Callable[[str], None]) -> RunResult:
    import optuna

    from qsearch.search.sensitivity import seed_configs, sensitivity_profile
    from qsearch.search.space import build_sampler

    expanded = expand_search_space(spec)
    seeded = expanded.model_copy(update={"sampler": expanded.sampler.model_copy(
        update={"seed": seed})})
    overhead, enqueue = 0.0, []
    if name == "random":
        # its own stream: NSGA-II's first generation is a RandomSampler with the same seed
        sampler = optuna.samplers.RandomSampler(seed=RANDOM_SEED_OFFSET + seed)
    else:
        sampler = build_sampler(seeded)
    if name == "sensitivity":
        prof = sensitivity_profile(expanded.base_config())
        overhead = sensitivity_seconds(expanded)
        enqueue = seed_configs(expanded, prof.as_dict(),
                               getattr(expanded.sampler, "sensitivity_seeds", 4))
    trials = run_inprocess(seeded, n_trials, sampler=sampler, enqueue=enqueue, memo=memo,
                           on_trial=lambda r: log(f"  {name} seed {seed} #{r.number}: "
                                                  f"{[round(v, 4) for v in r.values]} "
                                                  f"{r.seconds:.1f}s{' (memo)' if r.reused else ''}"))
    return RunResult(name, seed, trials, overhead, enqueue)


_SENS_S: dict[str, float] = {}


def sensitivity_seconds(spec: StudySpec) -> float:
    """Seconds one sensitivity computation takes in a warm process (measured once, uncached;
    the cached profile's own figure includes a cold process's first imports)."""
    from qsearch.search import sensitivity as S

    cfg = spec.base_config()
    key = cfg.content_hash()
    if key not in _SENS_S:
        t0 = time.perf_counter()
        S._compute(cfg, S.DEFAULT_PROBES, S.DEFAULT_BATCHES)
        _SENS_S[key] = time.perf_counter() - t0
    return _SENS_S[key]


def warm_up(spec: StudySpec) -> None:
    """One untimed training (first-call costs: imports, kernel compilation, the FP32 warm
    start if it is not cached) so no sampler's first trial pays them."""
    expanded = expand_search_space(spec)
    train_values(expanded, {}, memo=False)


def compute_to_reach(run: RunResult, curve: np.ndarray, target: float) -> float:
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return float(run.compute()[hit[0]]) if hit.size else math.inf


def write_html(path: Path, runs: dict[str, list[RunResult]], curves: dict[str, list[np.ndarray]],
               title: str) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colors = {"random": "#888888", "default": "#1f77b4", "sensitivity": "#d62728"}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("hypervolume vs trials",
                                                        "hypervolume vs compute seconds"))
    for name, rs in runs.items():
        for k, (r, c) in enumerate(zip(rs, curves[name])):
            common = dict(mode="lines", line=dict(color=colors.get(name)), legendgroup=name,
                          name=name, showlegend=k == 0, opacity=0.8)
            fig.add_trace(go.Scatter(x=list(range(1, len(c) + 1)), y=c.tolist(),
                                     hovertext=f"{name} seed {r.seed}", **common), 1, 1)
            fig.add_trace(go.Scatter(x=r.compute().tolist(), y=c.tolist(),
                                     hovertext=f"{name} seed {r.seed}",
                                     **{**common, "showlegend": False}), 1, 2)
    fig.update_xaxes(title_text="trials", row=1, col=1)
    fig.update_xaxes(title_text="compute (s)", row=1, col=2)
    fig.update_yaxes(title_text="hypervolume", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    fig.write_html(str(path), include_plotlyjs="cdn")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    spec = load_study_spec(args.spec)
    directions = list(spec.directions)
    ref = reference(spec)
    log = print if args.verbose else (lambda s: None)
    runs: dict[str, list[RunResult]] = {n: [] for n in args.samplers}
    t0 = time.perf_counter()
    warm_up(spec)
    print(f"warm-up (untimed): {time.perf_counter() - t0:.1f} s", flush=True)
    for seed in range(args.seeds):
        for name in args.samplers:
            t0 = time.perf_counter()
            runs[name].append(run_sampler(spec, name, seed, args.trials, not args.no_memo, log))
            print(f"{name:12s} seed {seed}: {time.perf_counter() - t0:6.1f} s wall", flush=True)
    curves = {n: [hv_curve(r, directions, ref) for r in rs] for n, rs in runs.items()}
    report: dict[str, Any] = {"spec": str(args.spec), "trials": args.trials, "seeds": args.seeds,
                              "reference": dict(zip(spec.objectives, ref)), "samplers": {}}
    print(f"\nhypervolume (reference {dict(zip(spec.objectives, ref))}), mean over "
          f"{args.seeds} seeds, after trial:")
    marks = sorted({m for m in (1, 2, 4, 5, 8, 10, 15, 20, 30, 40, args.trials)
                    if m <= args.trials})
    print(f"{'trials':>12s} " + " ".join(f"{m:>7d}" for m in marks))
    for n, cs in curves.items():
        mean = np.mean(np.stack(cs), axis=0)
        print(f"{n:>12s} " + " ".join(f"{mean[m - 1]:7.4f}" for m in marks))
    target = float(np.mean([c[-1] for c in curves.get("random", [])])) if "random" in curves \
        else float("nan")
    rand_total = float(np.mean([r.compute()[-1] for r in runs.get("random", [])])) \
        if "random" in runs else float("nan")
    print(f"\ncompute seconds (mean over seeds) and compute to reach random search's final "
          f"hypervolume {target:.4f} (random's total: {rand_total:.1f} s):")
    for n, rs in runs.items():
        reach = [compute_to_reach(r, c, target) for r, c in zip(rs, curves[n])]
        trials_to = [int(np.nonzero(c >= target - 1e-12)[0][0]) + 1
                     if (c >= target - 1e-12).any() else None for c in curves[n]]
        total = float(np.mean([r.compute()[-1] for r in rs]))
        finite = all(math.isfinite(x) for x in reach)
        ratio = float(np.mean(reach)) / rand_total if finite else math.inf
        print(f"{n:>12s}: total {total:7.1f} s, final HV {np.mean([c[-1] for c in curves[n]]):.4f}"
              f"; reaches target after trials {trials_to}, compute "
              f"{[round(x, 1) for x in reach]} s -> ratio {ratio:.3f}"
              + ("" if finite else " (not reached in every seed)"))
        report["samplers"][n] = {
            "final_hv": [float(c[-1]) for c in curves[n]], "hv_curves": [c.tolist() for c in
                                                                        curves[n]],
            "compute_s": [r.compute().tolist() for r in rs], "total_s": total,
            "trials_to_target": trials_to, "compute_to_target_s": reach, "ratio": ratio,
            "overhead_s": [r.overhead_s for r in rs],
            "seeds_enqueued": rs[0].seeds_enqueued if rs else []}
    report["target_hv"] = target
    if args.out:
        write_html(Path(args.out), runs, curves, f"{spec.name}: hypervolume, {args.trials} "
                   f"trials x {args.seeds} seeds")
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return report


def check_quickstart(args: argparse.Namespace) -> None:
    """16 in-process trials of the quickstart with its own sampler; print the front."""
    spec = load_study_spec(args.quickstart_spec)
    t0 = time.perf_counter()
    recs = run_inprocess(spec, args.quickstart_trials, memo=False,
                         on_trial=lambda r: print(f"  #{r.number}: {r.params} -> "
                                                  f"{[round(v, 4) for v in r.values]} "
                                                  f"({r.seconds:.1f} s)", flush=True))
    front = front_of(recs, list(spec.directions))
    distinct = {tuple(round(v, 6) for v in r.values) for r in front}
    acc = [r.values[0] for r in front]
    print(f"\n{len(recs)} trials in {time.perf_counter() - t0:.0f} s; front: {len(front)} trials, "
          f"{len(distinct)} distinct points, {spec.objectives[0]} {min(acc):.3f}..{max(acc):.3f}")
    for r in sorted(front, key=lambda r: r.values[1]):
        print(f"  #{r.number}: {dict(zip(spec.objectives, [round(v, 4) for v in r.values]))} "
              f"{r.params}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(ROOT / "studies" / "perlayer-digits.yaml"))
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--out", default="bench_search.html", help="Plotly HTML ('' for none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memo", action="store_true", help="retrain configs seen before")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--quickstart", action="store_true",
                   help="instead: run the quickstart in-process and print its front")
    p.add_argument("--quickstart-spec", default=str(ROOT / "studies" / "quickstart.yaml"))
    p.add_argument("--quickstart-trials", type=int, default=16)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    logging.basicConfig(level=logging.WARNING)
    if args.quickstart:
        check_quickstart(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
