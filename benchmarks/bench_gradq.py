"""Step-time overhead of gradient quantization (METHODS.md §4) against the plain QAT step.

Builds the real trainer pieces (``Trainer.setup``: model, LSQ conversion, methods, optimizer)
for ResNet-20 on 32x32 synthetic data, W4A4, and times full training steps (forward, loss,
backward, method hooks, optimizer step) on one fixed batch. Every variant runs twice in the
same process: with the fused (compiled) quantizer kernels of ``qsearch.quant.fused`` and with
the eager ones (``QSEARCH_NO_COMPILE=1`` set around its steps). Anchors, side by side: an FP32
ResNet-20 and torch.ao QAT (``prepare_qat_fx``, 8-bit fake quant), each stepped by a direct
loop (zero_grad, forward, loss, backward, SGD step; ``bench_trainer.make_step``), and Brevitas
when it is installed. Prints the median step time of each, its ratio to plain QAT of the same
mode, and to FP32; goals: INT8 per-tensor <= 1.15x, sample/channel <= 1.35x plain QAT.
``--digits`` instead trains tiny-cnn on digits (W4A4) with FP32, INT8, INT4 and INT4 +
hypernetwork gradients over several seeds and prints accuracy mean and spread.

    python benchmarks/bench_gradq.py --steps 20 --batch 64 --threads 1
    python benchmarks/bench_gradq.py --steps 12 --batch 64 --threads 2 --only tensor,sample
    python benchmarks/bench_gradq.py --digits --seeds 0 1 2 --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qsearch.config import parse_trial_config
from qsearch.quant import fused
from qsearch.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trainer  # noqa: E402 - the anchors' models and direct step loop

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


def train_step(trainer: Trainer, ctx, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step exactly as the trainer makes it."""
    if hasattr(trainer, "train_step"):
        trainer.train_step(ctx, x, y)
        return
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


@contextlib.contextmanager
def eager_kernels(on: bool):
    """``QSEARCH_NO_COMPILE=1`` for the duration (read by every quantizer call)."""
    if not on:
        yield
        return
    old = os.environ.get(fused.ENV_DISABLE)
    os.environ[fused.ENV_DISABLE] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[fused.ENV_DISABLE]
        else:
            os.environ[fused.ENV_DISABLE] = old


def prepare(model: str, batch: int, gradq: dict, warmup: int, threads: int):
    """A ready-to-step (trainer, ctx, x, y), after ``warmup`` untimed steps."""
    torch.manual_seed(0)
    trainer, ctx = build(model, batch, gradq, threads)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    ctx.model.train()
    for _ in range(warmup):
        train_step(trainer, ctx, x, y)
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


def anchors(model: str, batch: int, warmup: int):
    """{name: step()} of the direct-loop anchors on the same batch shape (ResNet-20 only)."""
    if model != "resnet20":
        return {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    out = {}
    for name, build in (("FP32 (direct loop)", bench_trainer.fp32_model),
                        ("torch.ao QAT 8b (direct loop)", lambda: bench_trainer.torch_ao_model(x)),
                        ("brevitas W4A4 (direct loop)", bench_trainer.brevitas_model)):
        try:
            m = build()
        except Exception as e:  # noqa: BLE001 - a broken third-party stack is reported
            print(f"{name}: skipped ({type(e).__name__}: {e})")
            continue
        if m is None:
            print(f"{name}: skipped (not installed)")
            continue
        out[name] = bench_trainer.make_step(m, x, y)
        for _ in range(warmup):
            out[name]()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings of the variants to time (plain QAT always)")
    ap.add_argument("--modes", default="fused,eager", help="fused, eager or both")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (with --threads 1, robust to other "
                         "processes competing for the cores)")
    ap.add_argument("--digits", action="store_true", help="accuracy study instead of timing")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if args.digits:
        digits_accuracy(args.seeds, args.epochs, args.threads)
        return
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    if "fused" in modes and not fused.compile_enabled("cpu"):
        print("fused kernels unavailable here (QSEARCH_NO_COMPILE or no C++ compiler): "
              "the fused rows run eagerly too")
    wanted = [n for n in VARIANTS if n == "plain QAT" or args.only is None
              or any(k in n for k in args.only.split(","))]
    steps: dict[tuple[str, str], callable] = {}
    for mode in modes:
        for name in wanted:
            with eager_kernels(mode == "eager"):
                trainer, ctx, x, y = prepare(args.model, args.batch, VARIANTS[name],
                                             args.warmup, args.threads)
            steps[(name, mode)] = (lambda t=trainer, c=ctx, x=x, y=y: train_step(t, c, x, y))
    for name, fn in anchors(args.model, args.batch, args.warmup).items():
        steps[(name, "-")] = fn
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    # Round-robin: one step of every variant in turn, so load changes on a shared CPU hit all
    # variants alike.
    for _ in range(args.steps):
        for key, fn in steps.items():
            with eager_kernels(key[1] == "eager"):
                t0 = clock()
                fn()
                samples[key].append(clock() - t0)
    med = {k: statistics.median(t) for k, t in samples.items()}
    fp32 = med.get(("FP32 (direct loop)", "-"))
    print(f"{args.model}, batch {args.batch}, CPU threads {args.threads}, W4A4, torch "
          f"{torch.__version__}; median of {args.steps} interleaved timed steps each, "
          f"{args.clock} clock")
    print(f"{'variant':38s} {'kernels':>7s} {'median ms':>10s} {'min ms':>8s} "
          f"{'/plain QAT':>10s} {'/FP32':>7s}")
    for key, t in samples.items():
        name, mode = key
        base = med.get(("plain QAT", mode if mode != "-" else modes[0]))
        rel = f"{med[key] / base:9.3f}x" if base else ""
        rel32 = f"{med[key] / fp32:6.3f}x" if fp32 else ""
        print(f"{name:38s} {mode:>7s} {med[key] * 1e3:10.1f} {min(t) * 1e3:8.1f} {rel:>10s} "
              f"{rel32:>7s}")
    goals = {"gradq 8b tensor": 1.15, "gradq 8b sample/channel": 1.35}
    for mode in modes:
        for name, goal in goals.items():
            if (name, mode) in med:
                r = med[(name, mode)] / med[("plain QAT", mode)]
                print(f"{mode}: {name} / plain QAT = {r:.3f} "
                      f"(goal <= {goal}: {'met' if r <= goal else 'NOT met'})")
    if "fused" in modes and "eager" in modes:
        for name in wanted:
            print(f"{name}: fused / eager step = "
                  f"{med[(name, 'fused')] / med[(name, 'eager')]:.3f}")


if __name__ == "__main__":
    main()
