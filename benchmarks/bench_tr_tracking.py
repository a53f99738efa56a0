"""TR/TALR tracking at the method's DEFAULT settings (METHODS.md §3): the measured transition
rate over the second half of training against the target, on digits/tiny-cnn and on
resnet20-sized layers (synthetic data). Overrides on the command line, e.g.

    OMP_NUM_THREADS=1 QSEARCH_NO_COMPILE=1 python benchmarks/bench_tr_tracking.py \
        [--setting digits|resnet20|both] [--momentum 0.9] [--epochs 6]
"""

from __future__ import annotations

import argparse
import time

from qsearch.config import parse_trial_config
from qsearch.train import train

SETTINGS = {
    "digits": {"model": "tiny-cnn", "dataset": "digits", "warm_start": {"epochs": 3}},
    # resnet20's layers (weight sizes do not depend on the image size); batch 16 gives ~19
    # steps per epoch, about digits' 17, so both runs give the controller the same time.
    "resnet20": {"model": "resnet20", "dataset": "synthetic", "batch_size": 16,
                 "data": {"num_samples": 512, "image_size": 16}, "warm_start": {"epochs": 1}},
}


def run(setting: str, epochs: int, tr: dict) -> float:
    cfg = {**SETTINGS[setting], "epochs": epochs, "device": "cpu", "w_bits": 4, "a_bits": 4,
           "methods": {"tr": {"enabled": True, **tr}}}
    t0 = time.time()
    r = train(parse_trial_config(cfg))
    h = r.history
    half = h[len(h) // 2:]
    measured = sum(x["tr.transition_rate"] for x in half) / len(half)
    target = sum(x["tr.target_rate"] for x in half) / len(half)
    per_epoch = "  ".join(f"e{x['epoch']} {x['tr.transition_rate']:.4f}/{x['tr.target_rate']:.4f}"
                          for x in h)
    print(f"{setting} tr={tr}: {per_epoch}  acc {r.metrics['accuracy']:.3f}  "
          f"second-half measured/target = {measured / target:.2f}  ({time.time() - t0:.0f}s)",
          flush=True)
    return measured / target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="both", choices=["digits", "resnet20", "both"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--momentum", type=float, default=None)
    args = ap.parse_args()
    tr = {} if args.momentum is None else {"momentum": args.momentum}
    for s in (["digits", "resnet20"] if args.setting == "both" else [args.setting]):
        run(s, args.epochs, tr)


if __name__ == "__main__":
    main()
