"""Elementwise kernels on tensors in any dense layout, without copying them to NCHW.

The trainer runs conv models channels-last on CPU (``qsearch.train.layout``). A channels-last
NCHW tensor is a contiguous NHWC block in memory, so the quantizers, which are elementwise or
reduce per sample/channel, can run on a flat (or NHWC) view of it and hand back a result in the
same layout. ``reshape(-1)`` instead would copy it into NCHW order, and the next convolution
would reorder it back.
"""

from __future__ import annotations

import torch

#: NCHW dimensions in the order a channels-last tensor stores them.
NHWC = (0, 2, 3, 1)


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also plainly contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last)


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order in which ``t``'s elements lie contiguously in memory (identity for a
    contiguous tensor, NHWC for channels-last); None when it has gaps or overlaps."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    if is_channels_last(t):
        return NHWC
    return None


def flat(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """``t``'s elements as a 1-D tensor in ``order`` (a view when ``t`` lies that way, a copy
    otherwise): elementwise kernels work in any order as long as every operand shares it."""
    if order is None:
        return t.reshape(-1)
    return t.permute(order).reshape(-1)


def unflat(values: torch.Tensor, like: torch.Tensor, order: tuple[int, ...] | None
           ) -> torch.Tensor:
    """``values`` (elements in ``order``, from :func:`flat`) in ``like``'s shape and layout."""
    if order is None:
        return values.view(like.shape)
    return values.as_strided(like.shape, like.stride())
