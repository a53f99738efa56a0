"""Training-step cost of qsearch's LSQ QAT against FP32, torch.ao QAT and Brevitas.

One process, one ResNet-20 (CIFAR, batch 128, 3x32x32 synthetic data), one SGD step =
zero_grad + forward + cross-entropy + backward + step. Variants:

- fp32: the float model; fp32-cl: the same in channels-last memory layout;
- qsearch: W4A4 LSQ via ``qsearch.quant.convert`` (first/last layer 8-bit), with the fused
  (compiled) LSQ kernels of ``qsearch.quant.fused``, the ReLUs fused into the quantizers that
  read them (``qsearch.quant.relu_lsq``); qsearch-cl: the same in channels-last,
  which is what the trainer runs on CPU (``qsearch.train.layout``);
- qsearch-cl-compiled: qsearch-cl with the native LSQ loops (``qsearch.quant.native_lsq``,
  which the other qsearch variants use where they load) switched off: the compiled kernels;
- qsearch-eager: the same model with the eager LSQ (``QSEARCH_NO_COMPILE=1`` around its steps);
- torch.ao: ``prepare_qat_fx`` with the default x86 QAT qconfig (8-bit fake-quant observers);
- brevitas: QuantConv2d/QuantLinear at W4A4 (first/last 8-bit), when brevitas is importable.

Variants are timed in interleaved rounds (each round times every variant for ``--steps``
steps), so a noisy, shared machine slows them alike; the per-step median over rounds is
reported with its ratio to FP32. The goal for qsearch is <= 1.05x FP32; the channels-last
pair is compared with its own layout and with plain (NCHW) FP32.

Every variant runs with the host-memory setting trials run with (``--malloc tuned``:
``qsearch.train.host_memory``); ``--malloc default`` keeps glibc's own settings. Page faults
and system time per step are printed beside the times: they are what the setting changes.

    python benchmarks/bench_trainer.py [--rounds 5 --steps 5 --batch 128 --threads N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.models import build_model
from qsearch.quant import Precision, convert, fused, native_lsq
from qsearch.train.host_memory import keep_freed_memory

Step = Callable[[], None]


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def fp32_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", 10, 3)


def qsearch_model() -> nn.Module:
    model = fp32_model()
    convert(model, Precision(w_bits=4, a_bits=4, first_bits=8, last_bits=8))
    return model


def torch_ao_model(example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fp32_model().train()
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (example[:2],))


def brevitas_model() -> nn.Module | None:
    """ResNet-20 with every conv/linear swapped for Brevitas' QuantConv2d/QuantLinear."""
    try:
        import brevitas.nn as qnn
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
    except ImportError:
        return None
    model = fp32_model()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, name in enumerate(names):
        m = model.get_submodule(name)
        bits = 8 if i in (0, len(names) - 1) else 4
        common = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=bits,
                      input_quant=Int8ActPerTensorFloat, input_bit_width=bits,
                      bias=m.bias is not None)
        if isinstance(m, nn.Conv2d):
            q = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                m.padding, groups=m.groups, **common)
        else:
            q = qnn.QuantLinear(m.in_features, m.out_features, **common)
        q.load_state_dict(m.state_dict(), strict=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


CLOCK = time.perf_counter


def time_steps(step: Step, n: int, kernels: str = "native") -> tuple[float, float, float]:
    """Seconds per step over ``n`` steps (``CLOCK``), with the minor page faults and the
    system (kernel) seconds per step. ``kernels``: ``native`` (the default: native LSQ loops
    where they load, else compiled), ``compiled`` (native loops off meanwhile) or ``eager``
    (QSEARCH_NO_COMPILE=1 meanwhile: neither)."""
    old = os.environ.get(fused.ENV_DISABLE)
    eager = kernels == "eager"
    if eager:
        os.environ[fused.ENV_DISABLE] = "1"
    native_lsq.set_enabled(kernels == "native")
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = CLOCK()
        for _ in range(n):
            step()
        t = (CLOCK() - t0) / n
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return t, (r1.ru_minflt - r0.ru_minflt) / n, (r1.ru_stime - r0.ru_stime) / n
    finally:
        native_lsq.set_enabled(True)
        if eager:
            if old is None:
                del os.environ[fused.ENV_DISABLE]
            else:
                os.environ[fused.ENV_DISABLE] = old


def kernels_of(variant: str) -> str:
    """Which quantizer kernels a variant runs: its name's suffix, else the default."""
    for kind in ("eager", "compiled"):
        if variant.endswith(kind):
            return kind
    return "native"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated subset of variants")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (with --threads 1, robust to other "
                         "processes competing for the cores)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: keep freed host memory as the trainer does "
                         "(qsearch.train.host_memory); default: glibc's own settings")
    args = ap.parse_args(argv)
    malloc = keep_freed_memory() if args.malloc == "tuned" else "default"
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    cl = torch.channels_last
    builders: dict[str, Callable[[], nn.Module | None]] = {
        "fp32": fp32_model,
        "fp32-cl": lambda: fp32_model().to(memory_format=cl),
        "qsearch": qsearch_model,
        "qsearch-cl": lambda: qsearch_model().to(memory_format=cl),
        "qsearch-cl-compiled": lambda: qsearch_model().to(memory_format=cl),
        "qsearch-eager": qsearch_model,
        "qsearch-cl-eager": lambda: qsearch_model().to(memory_format=cl),
        "torch.ao": lambda: torch_ao_model(x),
        "brevitas": brevitas_model,
    }
    wanted = set(args.only.split(",")) | {"fp32"} if args.only else set(builders)
    steps: dict[str, Step] = {}
    for name, build in builders.items():
        if name not in wanted:
            continue
        try:
            model = build()
        except Exception as e:  # noqa: BLE001 - a broken third-party stack is reported, not fatal
            print(f"{name:>13}: skipped ({type(e).__name__}: {e})")
            continue
        if model is None:
            print(f"{name:>13}: skipped (not importable)")
            continue
        steps[name] = make_step(model, x, y)
        # first-batch init, allocator warm-up, kernel compilation
        time_steps(steps[name], args.warmup, kernels_of(name))

    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[float]] = {name: [] for name in steps}
    system: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t, f, sys_s = time_steps(step, args.steps, kernels_of(name))
            times[name].append(t)
            faults[name].append(f)
            system[name].append(sys_s)

    print(f"resnet20, batch {args.batch}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median of {args.rounds} rounds x {args.steps} steps, "
          f"{args.clock} clock; malloc {malloc}")
    base = statistics.median(times["fp32"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>13}: {med * 1e3:8.1f} ms/step   x{med / base:5.2f} FP32   "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}; "
              f"{statistics.median(faults[name]):.0f} page faults, "
              f"{statistics.median(system[name]) * 1e3:.1f} ms system time per step)")
    if not fused.compile_enabled("cpu"):
        print("fused kernels unavailable here: qsearch ran eagerly too")
    print(f"native LSQ loops (qsearch, qsearch-cl): {native_lsq.status()}")
    # The goal compares like with like (same layout); the cross-layout ratio says what the
    # trainer's CPU layout costs against the FP32 step PyTorch runs by default.
    for name, ref in (("qsearch", "fp32"), ("qsearch-eager", "fp32"),
                      ("qsearch-cl", "fp32-cl"), ("qsearch-cl-compiled", "fp32-cl"),
                      ("qsearch-cl-eager", "fp32-cl")):
        if name in times and ref in times:
            ratio = statistics.median(times[name]) / statistics.median(times[ref])
            print(f"{name}/{ref} = {ratio:.3f} (measured; goal <= 1.05: "
                  f"{'met' if ratio <= 1.05 else 'NOT met'})")
    if "qsearch-cl" in times and "fp32" in times:
        ratio = statistics.median(times["qsearch-cl"]) / base
        print(f"qsearch-cl/fp32 = {ratio:.3f} (measured; against NCHW FP32, not the goal's "
              f"same-layout comparison)")
    if "qsearch" in times and "qsearch-eager" in times:
        print(f"qsearch fused/eager = "
              f"{statistics.median(times['qsearch']) / statistics.median(times['qsearch-eager']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
