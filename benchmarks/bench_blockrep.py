"""Block replacement (BWRF) vs plain LSQ QAT: accuracy over seeds and the step-time ratio.

Trains each setup with and without ``methods.blockrep`` from the same cached FP32 warm start
(same seed, epochs, data order) and prints mean/std accuracy, the measured training-time ratio
(blockrep epoch time / plain epoch time) and the cost model's backward_cost for both.

    python benchmarks/bench_blockrep.py                      # digits/tiny-cnn + resnet20/synthetic
    python benchmarks/bench_blockrep.py --setups tiny --seeds 0 1 2 --epochs 6
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


def run(setup: str, seed: int, blockrep: bool, args: argparse.Namespace) -> dict:
    data = {**SETUPS[setup], "epochs": args.epochs, "seed": seed, "device": args.device,
            "w_bits": args.bits, "a_bits": args.bits, "lr": args.lr,
            "methods": {"blockrep": {"enabled": blockrep}}}
    cfg = parse_trial_config(apply_overrides(data, args.set if blockrep else []))
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    hist = result.history
    return {
        "acc": result.metrics["accuracy"],
        "train_s": sum(h["epoch_s"] for h in hist),
        "backward_cost": result.metrics["backward_cost"],
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[],
                    help="extra override for the blockrep runs, e.g. methods.blockrep.tau=2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    for setup in args.setups:
        rows = {False: [], True: []}
        for seed in args.seeds:
            for on in (False, True):
                r = run(setup, seed, on, args)
                rows[on].append(r)
                print(f"{setup:9s} seed={seed} blockrep={'on ' if on else 'off'} "
                      f"acc={r['acc']:.4f} train_s={r['train_s']:.2f} "
                      f"backward_cost={r['backward_cost']:.3f}", flush=True)

        def stats(key: str, on: bool) -> tuple[float, float]:
            vals = [r[key] for r in rows[on]]
            return statistics.mean(vals), statistics.pstdev(vals)

        off_acc, on_acc = stats("acc", False), stats("acc", True)
        ratio = stats("train_s", True)[0] / stats("train_s", False)[0]
        print(f"== {setup} W{args.bits}A{args.bits}, {args.epochs} epochs, seeds {args.seeds}")
        print(f"   accuracy plain    {off_acc[0]:.4f} +- {off_acc[1]:.4f}")
        print(f"   accuracy blockrep {on_acc[0]:.4f} +- {on_acc[1]:.4f}  "
              f"(delta {on_acc[0] - off_acc[0]:+.4f})")
        print(f"   step-time ratio blockrep/plain: {ratio:.2f}x")
        print(f"   backward_cost plain {stats('backward_cost', False)[0]:.3f}  "
              f"blockrep {stats('backward_cost', True)[0]:.3f}")


if __name__ == "__main__":
    main()
