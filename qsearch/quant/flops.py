"""Executed GEMM FLOPs of training steps, counted from the operations that actually run.

A :class:`FlopMeter` is active around one training step (the trainer's shared step, so every
stage is covered). While it is active:

* every quantized conv/linear (:mod:`qsearch.quant.functional`) adds its forward GEMM, and its
  backward adds the dX and dW GEMMs it really computes: dX only when the (quantized) input
  needs a gradient, dW only when the (quantized) weight does, and only for the output channels
  in ``layer.backward.dw_channels`` (METHODS.md §2, LTS). The FLOPs a dense dW would have
  cost are kept beside them (``dw_dense``), so frozen work shows up as the difference;
* every other ``nn.Conv2d``/``nn.Linear`` module (CSQ's bit-plane layers, the FP32 teacher
  and suffixes of block replacement, the gradq hypernetwork) is seen by a global forward hook,
  which adds its forward GEMM and, when its output takes part in the backward, the dX/dW GEMMs
  autograd will run for it (dX iff its input needs a gradient, dW iff a weight parameter does).

Forward GEMMs of modules inside the model being trained are ``forward``; those of any other
module are ``extra_forward`` (work a plain QAT step would not do). Conventions match
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate; elementwise
work, BN and the optimizer are not GEMMs and are not counted), which the tests check on real
training steps. Unlike FlopCounterMode, grouped convs are counted at their real cost (its
conv-backward formula ignores ``groups``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

_ACTIVE: list[FlopMeter] = []


@dataclass
class FlopTotals:
    """GEMM FLOPs (2 per MAC) summed over the steps metered so far."""

    forward: float = 0.0  # the trained model's forward
    extra_forward: float = 0.0  # forwards outside it: teacher, FP suffixes, hypernetwork
    dx: float = 0.0  # input-gradient GEMMs that ran
    dw: float = 0.0  # weight-gradient GEMMs that ran (rows actually computed)
    dw_dense: float = 0.0  # what the quantized layers' dW would cost with nothing skipped
    dw_quant: float = 0.0  # the part of ``dw`` the quantized layers ran
    samples: int = 0  # training samples the metered steps processed
    steps: int = 0

    @property
    def backward(self) -> float:
        return self.dx + self.dw

    @property
    def dw_skipped(self) -> float:
        """Weight-gradient FLOPs of quantized layers that did not run (frozen channels and
        layers)."""
        return self.dw_dense - self.dw_quant

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))

    def copy(self) -> FlopTotals:
        return FlopTotals(**asdict(self))


def current() -> FlopMeter | None:
    """The innermost active meter, or None (then nothing is counted)."""
    return _ACTIVE[-1] if _ACTIVE else None


def conv_macs(out: torch.Tensor, w: torch.Tensor) -> int:
    """Multiply-accumulates of a conv forward: output elements x (Cin/groups * kh * kw)."""
    return out.numel() * w[0].numel()


def linear_macs(out: torch.Tensor, w: torch.Tensor) -> int:
    return out.numel() * w.shape[1]


def dw_rows(rows: torch.Tensor | None, out_channels: int) -> int:
    """Output channels whose weight gradient the custom backward computes (METHODS.md §2): the
    rows it computes on their own, or all of them where it runs the full GEMM (None; which
    convs do is :func:`qsearch.quant.functional.gathered_dw_rows`)."""
    return out_channels if rows is None else int(rows.numel())


class FlopMeter:
    """Counts GEMM FLOPs into ``totals`` while active (``with FlopMeter(totals, model):``)."""

    def __init__(self, totals: FlopTotals, model: nn.Module | None = None):
        self.totals = totals
        self.main = {id(m) for m in model.modules()} if model is not None else set()
        self._handle: Any = None

    def __enter__(self) -> FlopMeter:
        _ACTIVE.append(self)
        self._handle = nn.modules.module.register_module_forward_hook(_module_hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        elif self in _ACTIVE:
            _ACTIVE.remove(self)

    # -- recorded by qsearch.quant.functional (quantized layers) -------------------------
    def quant_forward(self, macs: int, x: torch.Tensor, w: torch.Tensor, custom: bool) -> None:
        """A quantized conv/linear forward of ``macs`` MACs. On the plain autograd path its
        backward is known now (aten computes dX iff x needs a gradient, dW iff w does); the
        custom backward records its own GEMMs (:meth:`quant_backward`)."""
        t = self.totals
        t.forward += 2.0 * macs
        if not torch.is_grad_enabled():
            return
        t.dw_dense += 2.0 * macs
        if custom:
            return
        if x.requires_grad:
            t.dx += 2.0 * macs
        if w.requires_grad:
            t.dw += 2.0 * macs
            t.dw_quant += 2.0 * macs

    def quant_backward(self, macs: int, dx: bool, dw_share: float) -> None:
        """The custom backward ran the dX GEMM (``dx``) and ``dw_share`` of the dW GEMM."""
        t = self.totals
        if dx:
            t.dx += 2.0 * macs
        if dw_share > 0:
            t.dw += 2.0 * macs * dw_share
            t.dw_quant += 2.0 * macs * dw_share

    # -- other conv/linear modules --------------------------------------------------------
    def module_forward(self, mod: nn.Module, inp: tuple, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not inp or not isinstance(inp[0], torch.Tensor):
            return
        w_shape = _weight_shape(mod)
        if w_shape is None:
            return
        if isinstance(mod, nn.Conv2d):
            macs = out.numel() * (w_shape[1] * w_shape[2] * w_shape[3])
        else:
            macs = out.numel() * w_shape[1]
        t = self.totals
        # A layer that builds its weight with a GEMM of its own (CSQ's bit planes) says so.
        built = getattr(mod, "weight_gemm_flops", None)
        w_fwd, w_bwd = built() if built is not None else (0, 0)
        if id(mod) in self.main:
            t.forward += 2.0 * macs + w_fwd
        else:
            t.extra_forward += 2.0 * macs + w_fwd
        t.dw += w_bwd
        if not (torch.is_grad_enabled() and out.requires_grad):
            return
        x_rg = inp[0].requires_grad
        aq = getattr(mod, "a_quant", None)  # an LSQ input quantizer with a learned step
        if aq is not None and getattr(aq, "enabled", False) and aq.step.requires_grad:
            x_rg = True
        w_rg = any(p.requires_grad for n, p in mod.named_parameters(recurse=False)
                   if n != "bias")
        if x_rg:
            t.dx += 2.0 * macs
        if w_rg:
            t.dw += 2.0 * macs


def _weight_shape(mod: nn.Module) -> tuple[int, ...] | None:
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor):
        return tuple(w.shape)
    shape = getattr(mod, "weight_shape", None)  # CSQ's bit-plane layers build their weight
    return tuple(shape) if shape is not None else None


def _module_hook(mod: nn.Module, inp: tuple, out: Any) -> None:
    if not isinstance(mod, (nn.Conv2d, nn.Linear)) or getattr(mod, "counts_own_flops", False):
        return
    meter = current()
    if meter is not None:
        meter.module_forward(mod, inp, out)
