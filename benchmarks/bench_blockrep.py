"""Block replacement (BWRF) vs plain LSQ QAT: accuracy over seeds and the step-time ratio.

Trains each setup at each weight/activation bit-width (default W2A2 and W3A3) with and
without ``methods.blockrep`` from the same cached FP32 warm start (same seed, epochs, data
order), and prints one line per run and one table: test accuracy mean +- sample std
[min..max] over seeds, the per-seed paired difference blockrep - plain, the measured
training-time ratio (blockrep epoch time / plain epoch time) and the executed backward_flops of
both. Defaults: digits/tiny-cnn, seeds 0 1 2, 4 QAT epochs, 6 warm-start epochs (~2 min on
one CPU thread).

    OMP_NUM_THREADS=1 QSEARCH_NO_COMPILE=1 python benchmarks/bench_blockrep.py
    python benchmarks/bench_blockrep.py --setups tiny resnet20 --bits 2 --epochs 6
    python benchmarks/bench_blockrep.py --set methods.blockrep.granularity=block
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsearch.config import apply_overrides, parse_trial_config
from qsearch.train.trainer import train

SETUPS = {
    "tiny": {"model": "tiny-cnn", "dataset": "digits", "warm_start": {"epochs": 6}},
    "resnet20": {
        "model": "resnet20", "dataset": "synthetic",
        "data": {"num_samples": 1024, "image_size": 16, "channels": 3, "num_classes": 10},
        "warm_start": {"epochs": 6, "lr": 0.05},
    },
}


def run(setup: str, seed: int, bits: int, blockrep: bool, args: argparse.Namespace) -> dict:
    data = {**SETUPS[setup], "epochs": args.epochs, "seed": seed, "device": args.device,
            "w_bits": bits, "a_bits": bits, "lr": args.lr,
            "methods": {"blockrep": {"enabled": blockrep}}}
    cfg = parse_trial_config(apply_overrides(data, args.set if blockrep else []))
    result = train(cfg)
    return {
        "acc": result.metrics["test_accuracy"],
        "val": result.metrics["accuracy"],
        "train_s": sum(h["epoch_s"] for h in result.history),
        "backward_flops": result.metrics["backward_flops"],
    }


def summary(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.4f} +- {sd:.4f} [{min(vals):.4f}..{max(vals):.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setups", nargs="+", default=["tiny"], choices=list(SETUPS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="extra override for the blockrep runs, e.g. methods.blockrep.tau=2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    table = ["| setup | bits | plain LSQ test acc | blockrep test acc | blockrep - plain, "
             "per seed (mean) | time ratio | backward_flops plain / blockrep |",
             "|---|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for setup in args.setups:
        for bits in args.bits:
            rows: dict[bool, list[dict]] = {False: [], True: []}
            for seed in args.seeds:
                for on in (False, True):
                    r = run(setup, seed, bits, on, args)
                    rows[on].append(r)
                    print(f"{setup:9s} W{bits}A{bits} seed={seed} "
                          f"blockrep={'on ' if on else 'off'} test_acc={r['acc']:.4f} "
                          f"val_acc={r['val']:.4f} train_s={r['train_s']:.2f} "
                          f"backward_flops={r['backward_flops']:.3f}", flush=True)

            def col(key: str, on: bool) -> list[float]:
                return [r[key] for r in rows[on]]

            d = [b - a for a, b in zip(col("acc", False), col("acc", True), strict=True)]
            ratio = statistics.mean(col("train_s", True)) / statistics.mean(col("train_s", False))
            table.append(
                f"| {setup} | W{bits}A{bits} | {summary(col('acc', False))} | "
                f"{summary(col('acc', True))} | {' '.join(f'{x:+.4f}' for x in d)} "
                f"({statistics.mean(d):+.4f}) | {ratio:.2f}x | "
                f"{statistics.mean(col('backward_flops', False)):.2f} / "
                f"{statistics.mean(col('backward_flops', True)):.2f} |")
    print(f"\n== {args.epochs} QAT epochs from the FP32 warm start, lr {args.lr}, seeds "
          f"{args.seeds}, first/last layers 8-bit ({time.perf_counter() - t0:.0f} s)")
    print("\n".join(table))


if __name__ == "__main__":
    main()
