"""CSQ on digits/tiny-cnn with the budget projection off: does the search itself meet the budget?

For target bits 2, 3 and 4 and seeds 0..S-1, trains one CSQ trial (``methods.csq`` defaults,
``enforce_budget: false``, first/last layers at 8 bits, so the two middle convs are searched)
and one uniform LSQ trial at ``w_bits = target`` (the same size as the budget; same epochs,
seed and warm start). Prints one row per (target, seed): the found average bits of the searched
layers (sign bit included, METHODS.md §5), its relative error against the target, whether the
fallback projection fired (it is off, so always 0 here), the per-layer bits, the stage-1
accuracy (bit-plane model at the end of stage 1), the final accuracy after stage 2 and the
uniform LSQ accuracy; then the mean final - uniform gap per target. Accuracies are validation
top-1 (what a search selects on).

    OMP_NUM_THREADS=1 QSEARCH_NO_COMPILE=1 python benchmarks/bench_csq.py [--seeds 3] [--epochs 8]

One run of the defaults takes about 3 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from qsearch.config import parse_trial_config
from qsearch.train import train


def _config(epochs: int, seed: int, **over):
    return parse_trial_config({"model": "tiny-cnn", "dataset": "digits", "epochs": epochs,
                               "device": "cpu", "seed": seed, "warm_start": {"epochs": 8},
                               **over})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{'target':>6} {'seed':>4} {'found':>6} {'rel err':>8} {'proj':>4} "
          f"{'bits (searched)':>16} {'stage-1':>8} {'final':>7} {'uniform':>8}")
    gaps: dict[int, list[float]] = {}
    errs: list[float] = []
    for target in (2, 3, 4):
        for seed in range(args.seeds):
            csq = train(_config(args.epochs, seed, methods={"csq": {
                "enabled": True, "target_bits": target, "enforce_budget": False}}))
            lsq = train(_config(args.epochs, seed, w_bits=target))
            m = csq.metrics
            searched = [b for n, b in csq.weight_bits.items() if n not in ("stage1.0", "fc")]
            err = m["csq.avg_bits"] / target - 1
            errs.append(abs(err))
            gaps.setdefault(target, []).append(m["val_accuracy"] - lsq.metrics["val_accuracy"])
            print(f"{target:>6} {seed:>4} {m['csq.avg_bits']:>6.3f} {err:>+8.1%} "
                  f"{int(m['csq.projection_fired']):>4} {str(searched):>16} "
                  f"{m['csq.stage1_accuracy']:>8.3f} {m['val_accuracy']:>7.3f} "
                  f"{lsq.metrics['val_accuracy']:>8.3f}")
    print(f"max |rel err| = {max(errs):.1%}")
    for target, g in gaps.items():
        print(f"target {target}: final - uniform LSQ = {100 * statistics.mean(g):+.2f} points "
              f"(mean of {len(g)} seeds; min {100 * min(g):+.2f})")


if __name__ == "__main__":
    main()
