"""Backward time of a quantized ResNet-20 with LTS-frozen output channels vs the FLOPs saved.

For each frozen fraction p of output channels (per conv/linear layer; the channels are picked
at random), the weight-gradient GEMM runs only for the unfrozen channels via
``layer.backward.dw_channels`` — exactly what LTS sets when whole channels are frozen. We time
``loss.backward()`` and, separately, the weight-gradient GEMMs alone (on inputs/output
gradients captured from one step), and compare the measured time saving with the counted
one (METHODS.md §7, LTS convention: sum rho*MACs / sum 2*MACs) and with the executed backward
FLOPs saved, as the trainer's FLOP meter counts them (qsearch/quant/flops.py) and as
``torch.utils.flop_counter.FlopCounterMode`` sees them. ``time/FLOPs`` is the measured
backward-time saving per executed-FLOPs saving (1.0: time falls as fast as the FLOPs; the goal
is >= 0.5). Configurations are timed round-robin, in an order rotated each round, and each
round's saving is taken against the same round's unfrozen time (load from other processes
drifts over seconds, so pairing cancels most of it); the table gives medians over rounds and
the range of time/FLOPs. The frozen share of the dW GEMMs bounds the whole-backward saving:
the LSQ elementwise backward (straight-through masks, step-size gradients), BN and dX are
untouched.

    python benchmarks/bench_lts.py [--batch 128] [--threads 2] [--reps 15] [--clock wall|cpu]
        [--layout nchw|channels-last] [--malloc tuned|default]
        [--gather native|index_select] [--gather-only] [--lsq native|compiled]

Measured (``OMP_NUM_THREADS=1 QSEARCH_NO_COMPILE=1 python benchmarks/bench_lts.py --threads 1
--clock cpu``, shared 2-core AMD EPYC, four runs): dW alone saves 0.31-0.39 at 50% frozen and
0.72-0.76 at 90%; time/FLOPs (median over rounds) 0.05-0.42 at 50% and 0.30-0.59 at 90%;
goal >= 0.5 not met at 50%. With the compiled kernels (no QSEARCH_NO_COMPILE), one run each:
time/FLOPs -0.09 / 0.34 (nchw) and 0.03 / 0.40 (channels-last). See METHODS.md §2.
2026-12-05, Intel Xeon, ``--threads 1 --clock cpu --layout channels-last``, compiled kernels:
before the fused ReLU + LSQ quantizer, backward 267.8 ms at 0%, time/FLOPs 0.07 (-0.42..0.40)
at 50% and 0.28 (0.17..0.53) at 90%; after it, backward 223.1 ms, time/FLOPs 0.20 (0.06..0.39)
and 0.38 (0.20..0.48): a cheaper elementwise backward makes dW a larger share of the time.

Since 2026-12-06 the backward runs with the host-memory setting the trainer applies
(``--malloc tuned``: ``qsearch.train.host_memory``); until then this script kept glibc's
defaults, so every figure above includes page faults that trials do not take. ``--malloc
default`` keeps glibc's settings; the page faults per backward are printed. Same command,
2026-12-06, runs alternating: ``--malloc default`` 12,000-17,000 faults per backward,
time/FLOPs 0.29 and 0.18 at 50%, 0.57 and 0.42 at 90%; ``tuned`` 0-1 faults, 0.42, 0.28,
0.44 and 0.45 at 50%, 0.59, 0.59, 0.64 and 0.60 at 90% (four runs).
"""

from __future__ import annotations

import argparse
import resource
import time
from statistics import median

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qsearch.cost import count_macs
from qsearch.models import build_model
from qsearch.quant import Precision, convert
from qsearch.quant.flops import FlopMeter, FlopTotals
from qsearch.quant import column_gather, native_lsq
from qsearch.quant.functional import _conv_weight_grad
from qsearch.train.host_memory import keep_freed_memory

#: wall time by default; ``--clock cpu`` (process CPU time) leaves out time the process waits
#: while other jobs hold the cores, the main noise on a shared machine.
CLOCK = time.perf_counter


def build(batch: int, channels_last: bool = False):
    model = build_model("resnet20", 10, 3)
    macs = count_macs(model, (3, 32, 32))
    qlayers = convert(model, Precision(w_bits=4, a_bits=4))
    model.train()
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:  # the layout the trainer uses on CPU (qsearch.train.layout)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model(x)  # initialise the activation step sizes
    return model, qlayers, macs, x, y


def set_frozen(qlayers, frac: float, seed: int = 0) -> dict[str, float]:
    """Freeze ``frac`` of each layer's output channels; returns rho per layer."""
    g = torch.Generator().manual_seed(seed)
    rho = {}
    for name, q in qlayers.items():
        c = q.weight.shape[0]
        n_frozen = int(round(frac * c))
        if n_frozen == 0:
            q.backward.dw_channels = None
        else:
            keep = torch.randperm(c, generator=g)[n_frozen:]
            q.backward.dw_channels = keep.sort().values
        rho[name] = n_frozen / c
    return rho


def time_backward(model, x, y) -> tuple[float, int]:
    """(seconds, minor page faults) of one ``loss.backward()``."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = CLOCK()
    loss.backward()
    t = CLOCK() - t0
    return t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def capture_dw_inputs(model, qlayers, x, y) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(quantized input, output gradient) of every layer from one step."""
    got: dict[str, list] = {}
    hooks = []
    for name, q in qlayers.items():
        def fwd(mod, inp, out, name=name):
            got[name] = [mod.a_quant(inp[0]).detach()]
            out.register_hook(lambda g, name=name: got[name].append(g.detach()))
        hooks.append(q.register_forward_hook(fwd))
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    return {n: (v[0], v[1]) for n, v in got.items()}


def time_dw(qlayers, captured) -> float:
    """Time of all layers' weight-gradient GEMMs, honouring ``dw_channels`` as the backward
    does (a layer whose full GEMM is cheaper than gathering its rows runs it in full)."""
    t0 = CLOCK()
    for name, q in qlayers.items():
        xi, g = captured[name]
        ch = q.backward.dw_channels
        if isinstance(q, torch.nn.Conv2d):
            _conv_weight_grad(xi, q.weight, g, q.stride, q.padding, q.dilation, q.groups, ch)
        elif ch is None:
            g.t() @ xi
        else:
            column_gather.gather_columns(g, ch).t() @ xi  # as _CustomLinear's backward
    return CLOCK() - t0


def gather_table(batch: int, reps: int) -> None:
    """Time of picking half of a ResNet-20 layer's output-gradient channels (columns of its
    channels-last ``(N*H*W, C)`` matrix): ``index_select`` against the native kernel."""
    print(f"gather of half the channels, (batch*H*W, C) float32 matrix, "
          f"{torch.get_num_threads()} threads, {CLOCK.__name__}, median of {reps}; "
          f"native kernel: {column_gather.status()}")
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        m = torch.randn(batch * hw * hw, c)
        idx = torch.randperm(c)[: c // 2].sort().values
        row = []
        for name, fn in (("index_select", lambda: m.index_select(1, idx)),  # noqa: B023
                         ("native", lambda: column_gather.gather_columns(m, idx)),  # noqa: B023
                         ("copy of all", m.clone)):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(reps):
                t0 = CLOCK()
                fn()
                ts.append(CLOCK() - t0)
            row.append(f"{name} {1e3 * median(ts):.3f} ms")
        print(f"  C={c:>2}, {m.shape[0]} rows: " + ", ".join(row))


def backward_flops(model, x, y) -> tuple[int, float]:
    """(FlopCounterMode's backward FLOPs, the FLOP meter's) of one step."""
    totals = FlopTotals()
    with FlopMeter(totals, model):
        loss = F.cross_entropy(model(x), y)
        with FlopCounterMode(display=False) as fc:
            loss.backward()
    return fc.get_total_flops(), totals.backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (less noise when shared)")
    ap.add_argument("--layout", choices=("nchw", "channels-last"), default="nchw",
                    help="memory layout of the model and batch (the trainer uses channels-last "
                         "on CPU)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: keep freed host memory as the trainer does "
                         "(qsearch.train.host_memory); default: glibc's own settings")
    ap.add_argument("--gather-only", action="store_true",
                    help="only time the gather of dY channels (index_select vs the native "
                         "kernel of qsearch.quant.column_gather) and exit")
    ap.add_argument("--gather", choices=("native", "index_select"), default="native",
                    help="how dY channels are gathered: the native kernel where it applies "
                         "(what trials do) or index_select everywhere")
    ap.add_argument("--lsq", choices=("native", "compiled"), default="native",
                    help="LSQ quantizer kernels: the native CPU loops where they load (what "
                         "trials do) or the compiled ones (qsearch.quant.native_lsq)")
    args = ap.parse_args()
    column_gather.set_enabled(args.gather == "native")
    native_lsq.set_enabled(args.lsq == "native")
    malloc = keep_freed_memory() if args.malloc == "tuned" else "default"
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gather_only:
        gather_table(args.batch, max(args.reps, 50))
        return
    model, qlayers, macs, x, y = build(args.batch, args.layout == "channels-last")
    total_macs = sum(macs.values())

    captured = capture_dw_inputs(model, qlayers, x, y)
    fracs = (0.0, 0.5, 0.9)
    bwd: dict[float, list[float]] = {f: [] for f in fracs}
    faults: dict[float, list[int]] = {f: [] for f in fracs}
    dw: dict[float, list[float]] = {f: [] for f in fracs}
    for r in range(args.reps + 1):  # round-robin, order rotated; the first round warms up
        for frac in fracs[r % 3:] + fracs[:r % 3]:
            set_frozen(qlayers, frac)
            t, n_faults = time_backward(model, x, y)
            bwd[frac].append(t)
            faults[frac].append(n_faults)
            dw[frac].append(time_dw(qlayers, captured))
    print(f"resnet20 W4A4 (first/last 8-bit), {args.layout}, batch {args.batch}, "
          f"{args.threads} CPU threads, "
          f"{args.reps} round-robin rounds, {args.clock} clock, malloc {malloc}, gather "
          f"{args.gather if args.gather == 'index_select' else column_gather.status()}, "
          f"LSQ {'compiled' if args.lsq == 'compiled' else native_lsq.status()}; "
          f"measured times and "
          f"page faults per backward are medians, savings are medians of each "
          f"round's saving against the same round's 0% (range in brackets)")
    print(f"{'frozen':>7} {'bwd ms':>8} {'faults':>7} {'bwd saved':>10} {'dW ms':>7} {'dW saved':>9} "
          f"{'counted':>8} {'executed':>9} {'FlopCounter':>12} {'time/FLOPs (range)':>22}")
    base_f = base_m = None
    for frac in fracs:
        rho = set_frozen(qlayers, frac)
        f, metered = backward_flops(model, x, y)
        base_f, base_m = base_f or f, base_m or metered
        counted = sum(rho[n] * m for n, m in macs.items()) / (2 * total_macs)
        executed = 1 - metered / base_m
        saved = paired_savings(bwd[frac][1:], bwd[0.0][1:])
        dw_saved = paired_savings(dw[frac][1:], dw[0.0][1:])
        if executed > 0:
            ratios = [v / executed for v in saved]
            ratio = f"{median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})"
        else:
            ratio = "-"
        print(f"{frac:>7.0%} {1e3 * median(bwd[frac][1:]):>8.1f} "
              f"{median(faults[frac][1:]):>7.0f} {median(saved):>10.3f} "
              f"{1e3 * median(dw[frac][1:]):>7.1f} {median(dw_saved):>9.3f} {counted:>8.3f} "
              f"{executed:>9.3f} {1 - f / base_f:>12.3f} {ratio:>22}")


def paired_savings(times: list[float], base: list[float]) -> list[float]:
    """Each round's saving ``1 - t / t0`` against the same round's unfrozen time: load from
    other processes drifts over seconds, so pairing within a round cancels most of it."""
    return [1 - t / t0 for t, t0 in zip(times, base)]

if __name__ == "__main__":
    main()
