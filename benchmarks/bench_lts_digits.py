"""LTS on digits/tiny-cnn: channel vs element granularity vs no LTS, counted vs executed saving.

For W4A4 and W2A2 (first/last 8-bit) and several seeds, trains one short trial per variant
(no LTS; LTS ``granularity: element``, the paper's rule; LTS ``granularity: channel``) and
prints, averaged over seeds: updates eliminated, the counted backward-FLOPs saving (paper
convention, what the modelled backward_bops credits), the executed saving (dW FLOPs that
really did not run), the executed ``backward_flops`` ratio to FP32 training, and validation /
test accuracy.

    QSEARCH_NO_COMPILE=1 python benchmarks/bench_lts_digits.py [--epochs 6] [--seeds 3] [--threads 2]
        [--mode sine-growth] [--warmup-frac 0.1]

The defaults (sine-growth threshold, 10% warm-up) are the setting the closing note reports;
``--mode linear-growth --warmup-frac 0.2`` is the method's default schedule.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from qsearch.config import parse_trial_config
from qsearch.train import train

VARIANTS = {
    "no LTS": None,
    "element": {"enabled": True, "granularity": "element"},
    "channel": {"enabled": True, "granularity": "channel"},
}
COLUMNS = ("lts.updates_eliminated", "lts.flops_saved_counted", "lts.flops_saved_executed",
           "backward_flops", "val_accuracy", "test_accuracy")
HEAD = ("updates elim", "counted", "executed", "bwd FLOPs", "val acc", "test acc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-epochs", type=int, default=4)
    ap.add_argument("--mode", default="sine-growth",
                    choices=["linear-growth", "sine-growth", "fixing"])
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    args = ap.parse_args()
    schedule = {"mode": args.mode, "warmup_frac": args.warmup_frac}
    torch.set_num_threads(args.threads)
    print(f"digits/tiny-cnn, {args.epochs} QAT epochs, LTS {args.mode} "
          f"(warm-up {args.warmup_frac}), "
          f"mean over {args.seeds} seeds (+- std of test acc)")
    print(f"{'bits':>5} {'variant':>8} " + " ".join(f"{h:>12}" for h in HEAD))
    for bits in (4, 2):
        for label, lts in VARIANTS.items():
            runs = []
            for seed in range(args.seeds):
                cfg = {"model": "tiny-cnn", "dataset": "digits", "epochs": args.epochs,
                       "device": "cpu", "seed": seed, "w_bits": bits, "a_bits": bits,
                       "warm_start": {"epochs": args.warmup_epochs},
                       "num_threads": args.threads}
                if lts:
                    cfg["methods"] = {"lts": {**lts, **schedule}}
                runs.append(train(parse_trial_config(cfg)).metrics)
            means = [statistics.mean(float(r.get(c, 0.0)) for r in runs) for c in COLUMNS]
            sd = statistics.pstdev(float(r["test_accuracy"]) for r in runs)
            print(f"W{bits}A{bits} {label:>8} " + " ".join(f"{v:>12.4f}" for v in means)
                  + f"  +-{sd:.4f}")


if __name__ == "__main__":
    main()
