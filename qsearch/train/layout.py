"""The memory layout a trial trains its conv models in.

On CPU, oneDNN's convolutions run faster on channels-last (NHWC) tensors than on PyTorch's
default NCHW: measured on ResNet-20, batch 128, one thread (``python
benchmarks/bench_trainer.py --threads 1 --clock cpu``), the FP32 step takes about 0.8x and the
W4A4 LSQ step about 0.75x the time of the same step in NCHW (docs/BENCHMARKS.md). The LSQ
kernels keep their input's layout (``qsearch.quant.lsq``), so a channels-last model stays
channels-last from layer to layer. On CUDA nothing was measured here, so the layout is left as
it is. ``QSEARCH_CHANNELS_LAST`` overrides (``0`` never, ``1`` always).

The layout is a speed setting, like the compiled kernels: values agree to float32 round-off
(convolutions sum in another order; gradient quantization draws its hash noise in memory
order, so other but equally distributed draws), and it is not part of a trial's config or its
hash.
"""

from __future__ import annotations

import torch
from torch import nn

from qsearch.config import defaults


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout models are trained in on ``device``."""
    setting = defaults.channels_last()
    if setting == "on" or (setting == "auto" and device.type == "cpu"):
        return torch.channels_last
    return torch.contiguous_format


def to_training_layout(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` with its 4-D parameters and buffers in the training layout
    (a model without 4-D tensors is unchanged)."""
    return model.to(device=device, memory_format=memory_format(device))
