"""Step-time overhead of gradient quantization (METHODS.md §4) against the plain QAT step.

Builds the real trainer pieces (``Trainer.setup``: model, LSQ conversion, methods, optimizer)
for ResNet-20 on 32x32 synthetic data, W4A4, and times full training steps (forward, loss,
backward, method hooks, optimizer step) on one fixed batch. Prints the median step time of
each variant and its ratio to plain QAT; the goal is <= 1.25x at 8-bit gradients.
``--digits`` instead trains tiny-cnn on digits (W4A4) with FP32, INT8, INT4 and INT4 +
hypernetwork gradients over several seeds and prints accuracy mean and spread.

    python benchmarks/bench_gradq.py --steps 20 --batch 64 --threads 1
    python benchmarks/bench_gradq.py --digits --seeds 0 1 2 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qsearch.config import parse_trial_config
from qsearch.train.trainer import Trainer

VARIANTS: dict[str, dict] = {
    "plain QAT": {"enabled": False},
    "gradq 8b tensor": {"enabled": True, "bits": 8},
    "gradq 8b sample/channel": {"enabled": True, "bits": 8, "granularity": "sample/channel"},
    "gradq 4b tensor": {"enabled": True, "bits": 4},
    "gradq 4b tensor + hypernet h=8": {"enabled": True, "bits": 4, "hypernet": {"enabled": True}},
    "gradq 32b (off, custom path unused)": {"enabled": True, "bits": 32, "first_last_bits": 32},
}


def build(model: str, batch: int, gradq: dict, threads: int):
    cfg = parse_trial_config({
        "model": model, "dataset": "synthetic", "device": "cpu", "num_threads": threads,
        "batch_size": batch, "epochs": 1, "warm_start": {"enabled": False},
        "data": {"num_samples": batch * 2, "image_size": 32, "channels": 3},
        "methods": {"gradq": gradq},
    })
    trainer = Trainer(cfg)
    ctx = trainer.setup(None)
    return trainer, ctx


def step(trainer: Trainer, ctx, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step exactly as ``Trainer.train_epoch`` does it."""
    for m in trainer.methods:
        m.before_forward(ctx)
    loss = F.cross_entropy(ctx.model(x), y)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for m in trainer.methods:
        m.after_backward(ctx)
    ctx.optimizer.step()
    for m in trainer.methods:
        m.after_step(ctx)
    ctx.step += 1


def prepare(model: str, batch: int, gradq: dict, warmup: int, threads: int):
    """A ready-to-step (trainer, ctx, x, y), after ``warmup`` untimed steps."""
    torch.manual_seed(0)
    trainer, ctx = build(model, batch, gradq, threads)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    ctx.model.train()
    for _ in range(warmup):
        step(trainer, ctx, x, y)
    return trainer, ctx, x, y


DIGITS_VARIANTS: dict[str, dict] = {
    "FP32 gradients": {"enabled": False},
    "INT8 gradients": {"enabled": True, "bits": 8},
    "INT4 gradients": {"enabled": True, "bits": 4},
    "INT4 gradients + hypernet": {"enabled": True, "bits": 4, "hypernet": {"enabled": True}},
}


def digits_accuracy(seeds: list[int], epochs: int, threads: int) -> None:
    from qsearch.train import train

    print(f"tiny-cnn / digits, W4A4, {epochs} QAT epochs, seeds {seeds}")
    for name, gq in DIGITS_VARIANTS.items():
        accs = []
        for seed in seeds:
            cfg = parse_trial_config({
                "model": "tiny-cnn", "dataset": "digits", "device": "cpu", "epochs": epochs,
                "seed": seed, "num_threads": threads, "warm_start": {"epochs": 3},
                "methods": {"gradq": gq},
            })
            accs.append(100 * train(cfg).metrics["accuracy"])
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name:28s} acc {statistics.mean(accs):6.2f} +- {sd:4.2f}  "
              f"(min {min(accs):.2f}, max {max(accs):.2f}; "
              + ", ".join(f"{a:.2f}" for a in accs) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--digits", action="store_true", help="accuracy study instead of timing")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if args.digits:
        digits_accuracy(args.seeds, args.epochs, args.threads)
        return
    runs = {name: prepare(args.model, args.batch, gq, args.warmup, args.threads)
            for name, gq in VARIANTS.items()}
    samples: dict[str, list[float]] = {k: [] for k in VARIANTS}
    # Round-robin: one step of every variant in turn, so load changes on a shared CPU hit all
    # variants alike.
    for _ in range(args.steps):
        for name, (trainer, ctx, x, y) in runs.items():
            t0 = time.perf_counter()
            step(trainer, ctx, x, y)
            samples[name].append(time.perf_counter() - t0)
    base_med = statistics.median(samples["plain QAT"])
    base_min = min(samples["plain QAT"])
    print(f"{args.model}, batch {args.batch}, CPU threads {args.threads}, W4A4, "
          f"{args.steps} interleaved timed steps per variant")
    print(f"{'variant':40s} {'median ms':>10s} {'ratio':>7s} {'min ms':>9s} {'ratio':>7s}")
    for name, t in samples.items():
        med, best = statistics.median(t), min(t)
        print(f"{name:40s} {med * 1e3:10.1f} {med / base_med:6.3f}x {best * 1e3:9.1f} "
              f"{best / base_min:6.3f}x")

if __name__ == "__main__":
    main()
