"""Does the gradq hypernetwork compensate? Accuracy with and without it (METHODS.md §4).

For each gradient bit-width (default 4 and 3) trains tiny-cnn on digits with quantized
gradients, once plainly and once with ``methods.gradq.hypernet`` (the meta network whose
output is a committed weight update), plus an FP32-gradient baseline, over several seeds, in a
setting where accuracy still moves: W2A2 (first/last layers 8-bit), no FP32 warm start, few
epochs, a reduced training split (``data.val_fraction`` carves the rest off as validation).
Prints one line per run and a table of test accuracy (mean, sample std, min..max over seeds)
and the hypernetwork's last measured update share (``||lr * H|| / ||optimizer step||``).
Every run of one seed shares its data order and initial weights (same seed).

    OMP_NUM_THREADS=1 QSEARCH_NO_COMPILE=1 python benchmarks/bench_hypernet.py
    python benchmarks/bench_hypernet.py --gbits 4 3 --seeds 0 1 2 --epochs 3 --bits 2
    python benchmarks/bench_hypernet.py --set methods.gradq.hypernet.lr=0.01
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsearch.config import apply_overrides, parse_trial_config
from qsearch.train.trainer import train


def config(seed: int, gbits: int | None, hyper: bool, args: argparse.Namespace):
    gradq = ({"enabled": False} if gbits is None else
             {"enabled": True, "bits": gbits, "first_last_bits": 8,
              "hypernet": {"enabled": hyper, "hidden": args.hidden, "lr": args.hyper_lr}})
    data = {"model": "tiny-cnn", "dataset": "digits", "device": "cpu", "seed": seed,
            "epochs": args.epochs, "w_bits": args.bits, "a_bits": args.bits,
            "lr": args.lr, "batch_size": args.batch,
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
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--bits", type=int, default=2, help="weight and activation bits")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--val-fraction", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--hyper-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="extra override for the hypernetwork runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    acc: dict[str, list[float]] = {}
    share: dict[str, list[float]] = {}
    variants = [("FP32 grads", None, False)]
    for b in args.gbits:
        variants += [(f"{b}-bit", b, False), (f"{b}-bit + hypernet", b, True)]
    t0 = time.perf_counter()
    for seed in args.seeds:
        for label, gbits, hyper in variants:
            r = train(config(seed, gbits, hyper, args))
            a = r.metrics["test_accuracy"]
            acc.setdefault(label, []).append(a)
            s = r.metrics.get("gradq.hypernet.update_share")
            if s is not None:
                share.setdefault(label, []).append(s)
            print(f"seed={seed} {label:22s} test_acc={a:.4f} val_acc={r.metrics['accuracy']:.4f}"
                  + (f" update_share={s:.3f}" if s is not None else ""), flush=True)
    print(f"\n== tiny-cnn/digits W{args.bits}A{args.bits}, no warm start, {args.epochs} epochs, "
          f"val_fraction {args.val_fraction}, lr {args.lr}, hypernet h={args.hidden} "
          f"lr={args.hyper_lr}, seeds {args.seeds} ({time.perf_counter() - t0:.0f} s)")
    print("| gradients | test accuracy mean +- std [min..max] | hypernet - plain, per seed |"
          " update share |")
    print("|---|---|---|---|")
    for label, _, hyper in variants:
        diff = ""
        if hyper:
            plain = acc[label.replace(" + hypernet", "")]
            d = [h - p for h, p in zip(acc[label], plain, strict=True)]
            diff = " ".join(f"{x:+.4f}" for x in d) + f" (mean {statistics.mean(d):+.4f})"
        sh = f"{statistics.mean(share[label]):.3f}" if label in share else ""
        print(f"| {label} | {summary(acc[label])} | {diff} | {sh} |")


if __name__ == "__main__":
    main()
