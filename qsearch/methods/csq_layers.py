"""Bit-plane conv/linear layers of CSQ (METHODS.md §5) and the read-out of their gates.

A searched layer's weight is built from ``n`` bit planes, most significant first::

    W = s * sum_j e_j * g_j * (sigmoid(beta*P_j) - sigmoid(beta*N_j)),  e_j = 2^(n-1-j)/(2^n-1)

with ``g_j = sigmoid(beta*m_j)`` (soft) or, from the ticket on, a hard 0/1 mask. ``P``/``N`` are
per-element real "bit logits" of the positive and negative part (sign-magnitude, as in the
reference code), ``m`` one gate logit per plane, ``s`` a learned per-layer scale.

Initialisation and the sigma(beta*0) = 0.5 question
----------------------------------------------------
The binary expansion of the warm-start weight on the n-bit grid (``S = max|W0|``,
``R = round(|W0| (2^n-1)/S)``) gives bits; a 1-bit becomes the logit ``+BIT_LOGIT`` and a 0-bit
``-BIT_LOGIT`` (the reference stores {0, 1}, which leaves every 0-bit on the knife edge
sigmoid(beta*0) = 0.5 for the whole run). Gates start at ``m = 0`` as in the reference, so every
plane starts half open (``g = 0.5``), and at ``beta = 1`` a (1, 0) bit pair contributes
``tanh(BIT_LOGIT/2)``, a (0, 0) pair exactly 0. Both factors are the same for every element
of the layer, so we fold them into the scale: ``s = S / (0.5 * tanh(BIT_LOGIT/2))``. The
reconstruction then equals the n-bit grid value of W0 exactly (within half a level) at init —
this is the reference's ``scaling = 1/sigmoid(mask_initial_value)`` of continuous
sparsification, but kept in the learned scale instead of the gate, so hardening the gates at
the ticket (``g -> 1[m > 0]``) causes no jump. As gates open and beta grows the open planes of
a layer scale up together; ``s`` is learned and BatchNorm follows every searched conv.

Counting bits
-------------
With hard gates and a high temperature every weight lies on the grid
``{k * s * e_last : |k| <= 2^k_on - 1}`` of the ``k_on`` active (contiguous) planes: a
sign-magnitude grid of ``2^(k_on+1) - 1`` levels. It needs ``k_on`` magnitude bits and a sign
bit, so a layer with ``k_on`` planes is counted as ``k_on + 1`` bits (:func:`plane_bits`) in the
budget, in ``size_mb`` and in the bits handed to stage 2, whose signed ``(k_on+1)``-bit LSQ grid
(``-2^k_on .. 2^k_on - 1``) contains every stage-1 level. (The reference counts ``k_on`` bits,
which under-counts every layer by one bit.)

Gate openness is read as the reference reads it: a gate is open when
``sigmoid(beta*m) >= 0.5``, i.e. ``m >= 0`` (so the initial ``m = 0`` counts as open).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.methods.csq_config import SIGN_BITS  # bits = active planes + the sign bit
from qsearch.quant.lsq import LSQQuantizer


def plane_bits(active_planes: int) -> int:
    """Bits of a layer whose ``active_planes`` contiguous planes are on (sign-magnitude)."""
    return active_planes + SIGN_BITS


#: |logit| of an initial bit: sigmoid(1) = 0.73 keeps bits trainable at beta = 1 and makes them
#: binary (sigmoid(+-beta)) as the temperature grows.
BIT_LOGIT = 1.0


def plane_values(n: int) -> torch.Tensor:
    """e_j = 2^(n-1-j) / (2^n - 1), MSB first (fixed constants, not parameters)."""
    return torch.tensor([2.0 ** (n - 1 - j) for j in range(n)]) / (2**n - 1)


@torch.no_grad()
def binary_expansion(w: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(P bits, N bits, S): planes-first 0/1 tensors of |w| on the n-bit grid, S = max|w|.

    P holds the bits of the positive weights, N of the negative ones (the other is all zero).
    """
    S = float(w.abs().max())
    levels = 2**n - 1
    r = torch.zeros_like(w) if S == 0 else torch.round(w.abs() * levels / S)
    bits = torch.stack([torch.div(r, 2 ** (n - 1 - j), rounding_mode="floor") % 2
                        for j in range(n)])
    pos = (w > 0).to(w.dtype)
    return bits * pos, bits * (1 - pos), S


class BitPlaneLayer(nn.Module):
    """Mixin of :class:`BitConv2d`/:class:`BitLinear`: bit-plane weight, gates, LSQ input quant.

    ``beta`` (global temperature) and ``hard`` are set by the CSQ method every step; ``mask``
    (buffer) holds the hard gate pattern once the ticket is drawn.
    """

    pbits: nn.Parameter
    nbits: nn.Parameter
    gates: nn.Parameter
    scale: nn.Parameter
    bias: nn.Parameter | None
    a_quant: LSQQuantizer

    def _init_planes(self, w: torch.Tensor, planes: int, a_bits: int, a_signed: bool | None,
                     gate_init: list[float] | None = None) -> None:
        p, nb, S = binary_expansion(w.detach().float(), planes)
        self.planes = planes
        self.beta = 1.0
        self.hard = False
        self.weight_shape = tuple(w.shape)
        self.pbits = nn.Parameter(((2 * p - 1) * BIT_LOGIT).to(w.dtype))
        self.nbits = nn.Parameter(((2 * nb - 1) * BIT_LOGIT).to(w.dtype))
        init = torch.zeros(planes) if gate_init is None else torch.tensor(gate_init)
        if init.shape != (planes,):
            raise ValueError(f"gate_init needs {planes} values, got {tuple(init.shape)}")
        self.gates = nn.Parameter(init.to(w.device, w.dtype))
        scale = S / (0.5 * math.tanh(BIT_LOGIT / 2)) if S > 0 else 1.0
        self.scale = nn.Parameter(torch.full((1,), scale, dtype=w.dtype, device=w.device))
        self.register_buffer("exps", plane_values(planes).to(w.device, w.dtype))
        self.register_buffer("mask", torch.zeros(planes, dtype=w.dtype, device=w.device))
        self.a_quant = LSQQuantizer(a_bits, "act", signed=a_signed)

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    def gate_values(self) -> torch.Tensor:
        """g_j: sigmoid(beta*m_j) before the ticket, the hard mask after."""
        if self.hard:
            return self.mask
        return torch.sigmoid(self.beta * self.gates)

    def soft_gates(self) -> torch.Tensor:
        return torch.sigmoid(self.beta * self.gates)

    def raw_pattern(self) -> list[int]:
        """Active planes as the gates stand: the hard mask after the ticket, else
        ``1[sigmoid(beta*m) >= 0.5]`` (the reference's reading)."""
        src = self.mask > 0.5 if self.hard else self.soft_gates().detach() >= 0.5
        return [int(v) for v in src.tolist()]

    def planes_weight(self) -> torch.Tensor:
        diff = torch.sigmoid(self.beta * self.pbits) - torch.sigmoid(self.beta * self.nbits)
        coef = self.exps * self.gate_values()
        return self.scale * torch.tensordot(coef, diff, dims=1)

    def weight_gemm_flops(self) -> tuple[int, int]:
        """(forward, backward) FLOPs of building the weight from the planes in a training
        step: :meth:`planes_weight` is one ``[P] x [P, N]`` product, and its backward one
        such product per side that needs a gradient (gates before the ticket; bit logits).
        Counted by :mod:`qsearch.quant.flops` beside the layer's conv/linear GEMMs."""
        n = 2 * self.planes * self.numel
        bwd = 0
        if torch.is_grad_enabled():
            if not self.hard and self.gates.requires_grad:
                bwd += n
            if self.pbits.requires_grad or self.nbits.requires_grad:
                bwd += n
        return n, bwd

    def set_pattern(self, pattern: list[int]) -> None:
        """Draw the ticket: gates become the hard 0/1 ``pattern`` (MSB first)."""
        self.mask.copy_(torch.tensor(pattern, dtype=self.mask.dtype))
        self.hard = True

    @property
    def w_bits(self) -> int:
        """Bits of the active planes, sign included (what the cost model reads while CSQ runs;
        at least one plane counts, as the read-out keeps at least one)."""
        return plane_bits(min(self.planes, max(1, sum(self.raw_pattern()))))

    @property
    def a_bits(self) -> int:
        return self.a_quant.bits


class BitConv2d(nn.Conv2d, BitPlaneLayer):
    """Conv2d whose weight is the CSQ bit-plane reconstruction (no latent ``weight`` tensor)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, planes: int, a_bits: int,
                   a_signed: bool | None = None, gate_init: list[float] | None = None
                   ) -> BitConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None,
                device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        q._init_planes(conv.weight, planes, a_bits, a_signed, gate_init)
        del q.weight  # the weight is computed from the planes
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.a_quant(x), self.planes_weight(), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


class BitLinear(nn.Linear, BitPlaneLayer):
    """Linear layer whose weight is the CSQ bit-plane reconstruction."""

    @classmethod
    def from_float(cls, lin: nn.Linear, planes: int, a_bits: int,
                   a_signed: bool | None = None, gate_init: list[float] | None = None
                   ) -> BitLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None,
                device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            if lin.bias is not None:
                q.bias.copy_(lin.bias)
        q._init_planes(lin.weight, planes, a_bits, a_signed, gate_init)
        del q.weight
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.planes_weight(), self.bias)


# ----------------------------------------------------------------------------- read-out


def contiguous_window(pattern: list[int], scores: list[float], min_planes: int = 1
                      ) -> tuple[int, int]:
    """(start, length) of the contiguous run of planes the layer keeps.

    The length is the number of active planes, clamped to ``[min_planes, n]`` (planes are
    counted, so resolving a gap never changes the size); among windows of that length the one
    with the largest sum of gate logits wins, ties going to the more significant window.
    """
    n = len(pattern)
    k = min(n, max(min_planes, sum(pattern)))
    best, best_start = -math.inf, 0
    for start in range(n - k + 1):
        total = sum(scores[start:start + k])
        if total > best + 1e-12:
            best, best_start = total, start
    return best_start, k


def is_contiguous(pattern: list[int]) -> bool:
    on = [i for i, v in enumerate(pattern) if v]
    return not on or on[-1] - on[0] + 1 == len(on)


def window_pattern(n: int, start: int, length: int) -> list[int]:
    return [1 if start <= j < start + length else 0 for j in range(n)]
