"""What folding a ReLU into the LSQ quantizer after it would save (an experiment: qsearch's
models do not fold today).

Why it is exact: an unsigned LSQ quantizer clamps at level 0, so quantizing ``x`` gives the
same values as quantizing ``relu(x)``; its straight-through gradient is zero below the range
as ReLU's is (the two differ only at ``x == 0`` exactly), and its step-size gradient there is
``-Qn = 0`` either way. Inside a ResNet-20 block, ``relu(bn1(conv1(x)))`` feeds only
``conv2``'s input quantizer, so that ReLU's forward and backward passes over the activation
could go. (The block's output ReLU also feeds the shortcut; folding it needs a two-output
kernel.) This times three steps side by side, interleaved as in bench_trainer.py: FP32 and
W4A4 QAT in channels-last, and the QAT model with the block-internal ReLUs removed and those
quantizers fixed to unsigned.

Measured 2026-12-04 (2-core Intel Xeon with AVX-512, ``python benchmarks/bench_relu_fold.py``,
one run): FP32 420.8, QAT 520.1 (1.236x), folded 504.6 ms per step (1.199x): 15.5 ms, 3% of
the QAT step. Not enough for the issue's 1.05x on this machine.

    python benchmarks/bench_relu_fold.py [--rounds 5 --steps 5 --batch 128 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import bench_trainer
import torch
import torch.nn.functional as F
from bench_trainer import fp32_model, make_step, qsearch_model, time_steps

from qsearch.models.resnet_cifar import BasicBlock
from qsearch.train.host_memory import keep_freed_memory


def _folded_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    out = self.bn2(self.conv2(self.bn1(self.conv1(x))))  # conv2's unsigned LSQ clamps at 0
    return F.relu(out + self.shortcut(x))


def folded_model() -> torch.nn.Module:
    model = qsearch_model()
    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.forward = types.MethodType(_folded_forward, block)
            quant = block.conv2.a_quant
            quant.signed_buf.fill_(0)  # what the first batch decides after a ReLU
            quant._mirror_buffers()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    bench_trainer.CLOCK = time.process_time  # CPU time: robust to other processes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    cl = torch.channels_last
    builders = {"fp32-cl": lambda: fp32_model().to(memory_format=cl),
                "qsearch-cl": lambda: qsearch_model().to(memory_format=cl),
                "qsearch-cl-folded": lambda: folded_model().to(memory_format=cl)}
    steps = {}
    for name, build in builders.items():
        steps[name] = make_step(build(), x, y)
        time_steps(steps[name], 3)  # first-batch init, compilation, allocator warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, args.steps)[0])
    base = statistics.median(times["fp32-cl"])
    print(f"resnet20, batch {args.batch}, {torch.get_num_threads()} threads, W4A4; median of "
          f"{args.rounds} rounds x {args.steps} steps, cpu clock (measured)")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:>18}: {t * 1e3:7.1f} ms/step  x {t / base:.3f} fp32-cl")


if __name__ == "__main__":
    main()
