"""The cost model of METHODS.md §7: model size, forward BOPs and backward (training) cost.

Everything is per sample and derived from per-layer MACs, bits and frozen fractions, so the
search can compare trials without timing them. MACs come from one forward with hooks; the
test suite cross-checks them against ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qsearch.quant.precision import QUANTIZABLE

FP32_BITS = 32


@dataclass
class LayerCost:
    """One conv/linear layer as the cost model sees it."""

    name: str
    kind: str  # "conv" | "linear"
    params: int  # N_l: weight elements
    macs: int  # forward multiply-accumulates per sample
    w_bits: int = FP32_BITS
    a_bits: int = FP32_BITS
    g_bits: int = FP32_BITS
    frozen_fraction: float = 0.0  # rho_l, time-averaged
    first: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CostReport:
    size_mb: float
    bops: float  # forward bit-operations per sample
    backward_bops: float
    fp32_backward_bops: float
    backward_cost: float  # backward_bops / fp32_backward_bops (1.0 = FP32 training)
    bwd_flops_saved: float  # LTS convention: sum rho*MACs / sum 2*MACs
    macs: int


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward MACs per sample of every conv/linear layer, by module name."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, inp, out) -> None:
            if isinstance(mod, nn.Conv2d):
                k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
                macs[name] = int(out[0].numel() * k)
            else:
                macs[name] = int(out[0].numel() * mod.weight.shape[1])

        return fn

    for name, m in model.named_modules():
        if isinstance(m, QUANTIZABLE):
            handles.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def extra_param_count(model: nn.Module, quantized: Iterable[str]) -> int:
    """Elements that deployment keeps in FP32 besides the quantized weights: biases, BN affine
    parameters and running statistics, and quantizer step sizes of enabled quantizers."""
    qweights = {f"{n}.weight" for n in quantized}
    total = 0
    for name, p in model.named_parameters():
        if name in qweights:
            continue
        if name.endswith(".step"):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            if not getattr(owner, "enabled", True):
                continue
        total += p.numel()
    for name, b in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            total += b.numel()
    return total


def compute_cost(
    layers: list[LayerCost], extra_params: int, extra_backward_bops: float = 0.0
) -> CostReport:
    size_bits = sum(layer.params * layer.w_bits for layer in layers) + FP32_BITS * extra_params
    bops = sum(layer.macs * layer.w_bits * layer.a_bits for layer in layers)
    bwd = extra_backward_bops
    fp32 = 0.0
    for layer in layers:
        dx = 0 if layer.first else layer.macs * layer.g_bits * layer.w_bits
        dw = layer.macs * layer.g_bits * layer.a_bits * (1.0 - layer.frozen_fraction)
        bwd += dx + dw
        fp32 += layer.macs * FP32_BITS * FP32_BITS * (1 if layer.first else 2)
    total_macs = sum(layer.macs for layer in layers)
    saved = sum(layer.frozen_fraction * layer.macs for layer in layers) / max(1, 2 * total_macs)
    return CostReport(
        size_mb=size_bits / 8 / 1e6,
        bops=float(bops),
        backward_bops=float(bwd),
        fp32_backward_bops=float(fp32),
        backward_cost=float(bwd / fp32) if fp32 else 0.0,
        bwd_flops_saved=float(saved),
        macs=int(total_macs),
    )


def layer_costs(
    model: nn.Module,
    input_shape: tuple[int, ...],
    stats: dict[str, dict[str, float]] | None = None,
    macs: dict[str, int] | None = None,
) -> list[LayerCost]:
    """LayerCost rows of a (converted or float) model; ``stats`` adds g_bits/frozen_fraction
    and may override w_bits per layer."""
    macs = macs if macs is not None else count_macs(model, input_shape)
    stats = stats or {}
    out = []
    for i, (name, n) in enumerate(macs.items()):
        m = model.get_submodule(name)
        st = stats.get(name, {})
        w_bits = int(st.get("w_bits", getattr(m, "w_bits", FP32_BITS)))
        out.append(LayerCost(
            name=name,
            kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            params=m.weight.numel(),
            macs=n,
            w_bits=w_bits,
            a_bits=int(st.get("a_bits", getattr(m, "a_bits", FP32_BITS))),
            g_bits=int(st.get("g_bits", FP32_BITS)),
            frozen_fraction=float(st.get("frozen_fraction", 0.0)),
            first=i == 0,
        ))
    return out
