"""Per-trial cost of Optuna's SQLite storage under three journal settings, side by side.

The driver tells Optuna each trial's outcome as several user attributes plus ``tell``, and
every one of those calls is its own SQLite commit. This measures that pattern (ask, N user
attributes, tell) with Optuna alone, on the folder given, for SQLite's default rollback
journal, ``synchronous=NORMAL``, and ``journal_mode=WAL`` with ``synchronous=NORMAL``. The
settings round-robin over --rounds and the minimum per setting is kept. It shows what a
journal change would save before qsearch's store takes one (docs/BENCHMARKS.md says why it has
not yet).

    python benchmarks/bench_sqlite_journal.py [--trials 10] [--attrs 7] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import optuna

SETTINGS: dict[str, list[str]] = {
    "default (rollback journal, synchronous=FULL)": [],
    "synchronous=NORMAL": ["PRAGMA synchronous=NORMAL"],
    "journal_mode=WAL, synchronous=NORMAL": ["PRAGMA journal_mode=WAL",
                                             "PRAGMA synchronous=NORMAL"],
}


def per_trial_ms(path: Path, pragmas: list[str], trials: int, attrs: int) -> float:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60)
        for p in pragmas:
            conn.execute(p)
        return conn

    # SQLAlchemy's public ``creator`` hook: every pooled connection gets the pragmas.
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect})
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    t0 = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        for k in range(attrs):
            trial.set_user_attr(f"attr{k}", k)
        study.tell(trial, [0.5, 1.0])
    return 1e3 * (time.perf_counter() - t0) / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--attrs", type=int, default=7, help="user attributes set per trial")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="folder for the databases "
                    "(default: a temporary folder; the disk is what is measured)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="qsearch-journal-"))
    best = {name: float("inf") for name in SETTINGS}
    for r in range(args.rounds):
        for i, (name, pragmas) in enumerate(SETTINGS.items()):
            ms = per_trial_ms(folder / f"r{r}-s{i}.db", pragmas, args.trials, args.attrs)
            best[name] = min(best[name], ms)
    print(f"measured: Optuna ask + {args.attrs} user attributes + tell, SQLite in {folder}, "
          f"min of {args.rounds} rounds of {args.trials} trials")
    base = best[next(iter(SETTINGS))]
    for name, ms in best.items():
        print(f"  {name:<46} {ms:7.1f} ms/trial  ({ms / base:.2f}x the default)")


if __name__ == "__main__":
    main()
