"""Quantized conv/linear layers: LSQ on the input activation and on the weight."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qsearch.quant import functional, input_step
from qsearch.quant.functional import BackwardOptions
from qsearch.quant.lsq import LSQQuantizer

WeightTransform = Callable[[torch.Tensor], torch.Tensor]


class QuantLayer(nn.Module):
    """Mixin of QConv2d/QLinear. Methods plug in through three attributes:

    ``backward`` (:class:`BackwardOptions`) changes the backward GEMMs; ``weight_transform``
    maps the latent weight before quantization (hypernetwork compensation);
    ``w_quant``/``a_quant`` hold the LSQ step sizes and bits.
    """

    w_quant: LSQQuantizer
    a_quant: LSQQuantizer
    weight: nn.Parameter
    backward: BackwardOptions
    weight_transform: WeightTransform | None
    #: Its GEMMs are counted by :mod:`qsearch.quant.functional` (which sees the quantized
    #: operands and the skipped dW channels), not by the generic module hook of
    #: :mod:`qsearch.quant.flops`.
    counts_own_flops = True

    def _init_quant(self, w_bits: int, a_bits: int, a_signed: bool | None) -> None:
        self.w_quant = LSQQuantizer(w_bits, "weight")
        self.a_quant = LSQQuantizer(a_bits, "act", signed=a_signed)
        self.backward = BackwardOptions()
        self.weight_transform = None
        if self.w_quant.enabled:
            self.w_quant.init_step(self.weight)

    @property
    def w_bits(self) -> int:
        return self.w_quant.bits

    @property
    def a_bits(self) -> int:
        return self.a_quant.bits

    def set_precision(self, w_bits: int, a_bits: int) -> None:
        """Change bits; the weight step is re-initialised from the current weight."""
        self.w_quant.set_bits(w_bits)
        self.a_quant.set_bits(a_bits)
        if self.w_quant.enabled:
            self.w_quant.init_step(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.weight_transform is not None:
            w = self.weight_transform(w)
        return self.w_quant(w)


class QConv2d(nn.Conv2d, QuantLayer):
    """nn.Conv2d with LSQ weight and input-activation quantizers."""

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, w_bits: int, a_bits: int, a_signed: bool | None = None
    ) -> QConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError("only zero padding is supported for quantized convs")
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        q._init_quant(w_bits, a_bits, a_signed)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if input_step.applies(x, self.a_quant, self.training, self.backward.active):
            # Data in (the first layer): the step gradient without the input gradient.
            return input_step.conv2d(x, self.a_quant, self.quantized_weight(), self.bias,
                                     self.stride, self.padding, self.dilation, self.groups)
        x = self.a_quant(x)
        w = self.quantized_weight()
        return functional.conv2d(
            x, w, self.bias, self.stride, self.padding, self.dilation, self.groups, self.backward
        )


class QLinear(nn.Linear, QuantLayer):
    """nn.Linear with LSQ weight and input-activation quantizers."""

    @classmethod
    def from_float(
        cls, lin: nn.Linear, w_bits: int, a_bits: int, a_signed: bool | None = None
    ) -> QLinear:
        q = cls(
            lin.in_features, lin.out_features, lin.bias is not None,
            device=lin.weight.device, dtype=lin.weight.dtype,
        )
        with torch.no_grad():
            q.weight.copy_(lin.weight)
            if lin.bias is not None:
                q.bias.copy_(lin.bias)
        q._init_quant(w_bits, a_bits, a_signed)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_quant(x)
        return functional.linear(x, self.quantized_weight(), self.bias, self.backward)
