"""Honest training cost of a trial (METHODS.md §7): executed FLOPs and measured time.

:class:`TrainingCosts` wraps every step of the shared training loop (QAT epochs and precision
stages such as CSQ's stage 1 alike), so it covers the whole trial:

* ``backward_flops`` (executed): GEMM FLOPs of the backward that really ran (dX and dW, with
  LTS-skipped dW rows and layers left out, :mod:`qsearch.quant.flops`) plus every forward
  outside the trained model (block replacement's teacher and FP suffixes, the gradq
  hypernetwork), per training sample, as a ratio to the dense FP32 backward of the same model
  over the same samples (``sum_l 2 * 2 * MACs_l`` minus the first layer's dX per sample).
  Fake-quantized operands cost FP32 FLOPs here: nothing runs at low precision on CPU.
* ``backward_time`` (measured): wall seconds per training sample spent in the backward part
  of a step — the methods' ``loss`` hooks (their extra forwards) and ``loss.backward()`` —
  on the trial's device (the gradq hypernetwork's forward runs inside the model's forward, so
  only its backward is in this time; its FLOPs are all in ``backward_flops``) (``time.perf_counter`` on CPU, whose ops are synchronous;
  ``torch.cuda.Event`` pairs on CUDA, read once per report). ``backward_time_ratio`` divides
  it by the backward of one plain FP32 training step of the same architecture, batch size and
  device, measured in this process (cached: measured once per worker, see
  :func:`fp32_reference_backward_s`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.quant.flops import FlopMeter, FlopTotals

_FP32_REFERENCE: dict[tuple, float] = {}


def fp32_backward_flops_per_sample(macs: dict[str, int]) -> float:
    """Dense FP32 training backward per sample: dX and dW of every conv/linear (2 FLOPs per
    MAC each), without the first layer's dX (its input is the data)."""
    if not macs:
        return 0.0
    first = next(iter(macs.values()))
    return float(sum(4 * m for m in macs.values()) - 2 * first)


class TrainingCosts:
    """Accumulates executed FLOPs and backward time over a trial's training steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flops = FlopTotals()
        self.backward_s = 0.0
        self._events: list[tuple[Any, Any]] = []

    @contextmanager
    def step(self, model: nn.Module, batch: int) -> Iterator[None]:
        """One training step of ``model`` on ``batch`` samples: counts its GEMMs."""
        with FlopMeter(self.flops, model):
            yield
        self.flops.samples += int(batch)
        self.flops.steps += 1

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Time the enclosed backward work on the device."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.backward_s += time.perf_counter() - t0

    def _resolve(self) -> None:
        if self._events:
            torch.cuda.synchronize(self.device)
            self.backward_s += sum(s.elapsed_time(e) for s, e in self._events) / 1e3
            self._events = []

    def metrics(self, macs: dict[str, int], fp32_ref_s: float | None) -> dict[str, float]:
        """The three executed/measured figures (and their parts) for a report."""
        self._resolve()
        t = self.flops
        n = max(1, t.samples)
        ref = fp32_backward_flops_per_sample(macs)
        per_sample = (t.backward + t.extra_forward) / n
        out = {
            "backward_flops": per_sample / ref if ref else 0.0,
            "backward_time": self.backward_s / n,
            "cost.backward_flops_per_sample": per_sample,
            "cost.fp32_backward_flops_per_sample": ref,
            "cost.forward_flops_per_sample": t.forward / n,
            "cost.extra_forward_flops_per_sample": t.extra_forward / n,
            "cost.dx_flops_per_sample": t.dx / n,
            "cost.dw_flops_per_sample": t.dw / n,
            "cost.dw_skipped_flops_per_sample": t.dw_skipped / n,
            "cost.trained_samples": float(t.samples),
        }
        if fp32_ref_s:
            out["backward_time_ratio"] = out["backward_time"] / fp32_ref_s
            out["cost.fp32_backward_time"] = fp32_ref_s
        return out

    def state_dict(self) -> dict[str, Any]:
        self._resolve()
        return {"flops": self.flops.state_dict(), "backward_s": self.backward_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flops = FlopTotals()
        self.flops.load_state_dict(state.get("flops", {}))
        self.backward_s = float(state.get("backward_s", 0.0))
        self._events = []


def fp32_reference_backward_s(model_name: str, num_classes: int, in_channels: int,
                              input_shape: tuple[int, ...], batch: int, device: torch.device,
                              reps: int = 5) -> float:
    """Seconds per sample of ``loss.backward()`` of one plain FP32 training step of
    ``model_name`` at ``batch`` on ``device`` (median of ``reps`` after one warm-up step).

    Measured once per (model, classes, input, batch, device, CPU threads) in this process and
    cached. Torch's RNG state is forked, so measuring never changes a trial's random stream
    (a resumed trial stays bit-identical whether or not its worker measured already)."""
    from qsearch.models import build_model
    from qsearch.train.layout import memory_format, to_training_layout

    # In the layout trials train in, so the ratio compares like with like.
    key = (model_name, num_classes, in_channels, tuple(input_shape), int(batch), str(device),
           torch.get_num_threads(), str(memory_format(device)))
    if key in _FP32_REFERENCE:
        return _FP32_REFERENCE[key]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        model = to_training_layout(build_model(model_name, num_classes, in_channels),
                                   device).train()
        x = torch.randn(batch, *input_shape, device=device)
        y = torch.randint(0, num_classes, (batch,), device=device)
        costs = TrainingCosts(device)
        times = []
        for i in range(reps + 1):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            before = costs.backward_s
            with costs.timed():
                loss.backward()
            costs._resolve()
            if i:
                times.append(costs.backward_s - before)
    value = statistics.median(times) / batch
    _FP32_REFERENCE[key] = value
    return value
