"""Does the gradq hypernetwork compensate? Accuracy with and without it (METHODS.md §4).

For each base LR and gradient bit-width (default 4 and 3) trains tiny-cnn on digits with
quantized gradients, once plainly and once per hypernetwork LR with ``methods.gradq.hypernet``
(the meta network whose output is a committed weight update), plus an FP32-gradient baseline,
over several seeds, in a setting where accuracy still moves: W2A2 (first/last layers 8-bit),
no FP32 warm start, 6 epochs, half the training split (``data.val_fraction: 0.5`` carves the
rest off as validation). Two base LRs: 0.02 (the trial default; under-trained from scratch in
6 epochs) and 0.1 (better tuned), because a meta network trained on the post-update loss can
also act as a learned step size, and only the second LR tells that apart from compensation.
Prints one line per run and, per base LR, a table of test accuracy (mean, sample std,
min..max over seeds), the per-seed paired difference hypernet - plain, and the hypernetwork's
update share at the last step of the run (``||lr * H(G_prev)|| / ||optimizer step||``).
All runs of one seed share data order and initial weights. ~3 minutes on one CPU thread.

    OMP_NUM_THREADS=1 QSEARCH_NO_COMPILE=1 python benchmarks/bench_hypernet.py
    python benchmarks/bench_hypernet.py --lrs 0.02 --hyper-lrs 0.01 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsearch.config import apply_overrides, parse_trial_config
from qsearch.train.trainer import train


def config(seed: int, lr: float, gbits: int | None, hyper_lr: float | None,
           args: argparse.Namespace):
    """One trial config; ``gbits=None``: FP32 gradients; ``hyper_lr=None``: no hypernet."""
    hyper = hyper_lr is not None
    gradq = ({"enabled": False} if gbits is None else
             {"enabled": True, "bits": gbits, "first_last_bits": 8,
              "hypernet": {"enabled": hyper, "hidden": args.hidden, "lr": hyper_lr or 1e-3}})
    data = {"model": "tiny-cnn", "dataset": "digits", "device": "cpu", "seed": seed,
            "epochs": args.epochs, "w_bits": args.bits, "a_bits": args.bits,
            "lr": lr, "batch_size": args.batch,
            "data": {"val_fraction": args.val_fraction},
            "warm_start": {"enabled": False}, "methods": {"gradq": gradq}}
    return parse_trial_config(apply_overrides(data, args.set if hyper else []))


def summary(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.4f} +- {sd:.4f} [{min(vals):.4f}..{max(vals):.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gbits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--bits", type=int, default=2, help="weight and activation bits")
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.02, 0.1], help="base SGD LRs")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--val-fraction", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--hyper-lrs", nargs="+", type=float, default=[1e-3, 1e-2],
                    help="hypernetwork Adam LRs (1e-3 is the config default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="extra override for the hypernetwork runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    variants: list[tuple[str, int | None, float | None]] = [("FP32 grads", None, None)]
    for b in args.gbits:
        variants.append((f"{b}-bit", b, None))
        variants += [(f"{b}-bit + hypernet lr {hl:g}", b, hl) for hl in args.hyper_lrs]
    tables = []
    for lr in args.lrs:
        acc: dict[str, list[float]] = {}
        share: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for seed in args.seeds:
            for label, gbits, hl in variants:
                r = train(config(seed, lr, gbits, hl, args))
                a = r.metrics["test_accuracy"]
                acc.setdefault(label, []).append(a)
                s = r.metrics.get("gradq.hypernet.update_share")
                if s is not None:
                    share.setdefault(label, []).append(s)
                print(f"lr={lr:g} seed={seed} {label:28s} test_acc={a:.4f} "
                      f"val_acc={r.metrics['accuracy']:.4f} "
                      f"train_loss={r.metrics['train_loss']:.4f}"
                      + (f" update_share={s:.3f}" if s is not None else ""), flush=True)
        lines = [f"\n== tiny-cnn/digits W{args.bits}A{args.bits} (first/last 8-bit), no warm "
                 f"start, {args.epochs} epochs, val_fraction {args.val_fraction}, SGD lr {lr:g}, "
                 f"hypernet h={args.hidden}, seeds {args.seeds} "
                 f"({time.perf_counter() - t0:.0f} s)",
                 "| gradients | test accuracy mean +- std [min..max] "
                 "| hypernet - plain, per seed (mean) | update share |",
                 "|---|---|---|---|"]
        for label, gbits, hl in variants:
            diff = ""
            if hl is not None:
                d = [h - p for h, p in zip(acc[label], acc[f"{gbits}-bit"], strict=True)]
                diff = " ".join(f"{x:+.4f}" for x in d) + f" ({statistics.mean(d):+.4f})"
            sh = f"{statistics.mean(share[label]):.3f}" if label in share else ""
            lines.append(f"| {label} | {summary(acc[label])} | {diff} | {sh} |")
        tables.append("\n".join(lines))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
