"""CIFAR ResNet-20 (He et al. 2016, option A shortcuts: 0.27M parameters).

The blocks pass *pre-activation* tensors: a block's output is ``bn2(...) + shortcut`` and the
next block (or the head) applies the ReLU. The same function as the paper's
``relu(bn2(...) + shortcut)`` per block, with the same parameters; written this way, each ReLU
sits next to the convolution that reads it, so :func:`~qsearch.quant.relu_lsq.relu_quantize`
can fuse it with that convolution's input quantizer once the model is quantized.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from qsearch.models.registry import ModelSplit, check_granularity, register_model, sequential_split
from qsearch.quant.relu_lsq import relu_quantize


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin  # option A: subsample + zero-pad channels, no parameters

    def shortcut(self, x):
        if self.stride != 1 or self.pad:
            # x[:, :, ::stride, ::stride], as a 1x1 max-pool: the same values and gradient, but
            # its backward keeps a channels-last gradient channels-last (a strided slice's
            # backward writes a fresh NCHW tensor, which the next kernel must reorder).
            x = F.max_pool2d(x, 1, self.stride)
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, y):
        """``y``: the block input before its ReLU; returns the output before the next one."""
        r, x = relu_quantize(y, self.conv1)  # r = relu(y) for the shortcut, x for conv1
        _, h = relu_quantize(self.bn1(self.conv1(x)), self.conv2, need_relu=False)
        return self.bn2(self.conv2(h)) + self.shortcut(r)


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, cin, stages = (16, 32, 64), 16, []
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        y = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(y), 1).flatten(1))


def split_resnet_cifar(model: nn.Module, granularity: str) -> ModelSplit:
    """Stages layer1..3, or every BasicBlock; the stem joins the first block. The block
    outputs are pre-activation (the next block applies the ReLU), so the head starts with it."""
    check_granularity(granularity)
    stem: list = ["conv1", "bn1"]
    if granularity == "stage":
        taps = ["layer1", "layer2", "layer3"]
    else:
        taps = [f"layer{s}.{j}" for s in (1, 2, 3)
                for j in range(len(model.get_submodule(f"layer{s}")))]
    groups = [[*stem, taps[0]]] + [[t] for t in taps[1:]]
    return sequential_split(model, groups,
                            [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), "fc"])


@register_model("resnet20", description="CIFAR ResNet-20, 0.27M params", input_hint="3x32x32",
                split=split_resnet_cifar)
def resnet20(num_classes: int, in_channels: int) -> nn.Module:
    return ResNetCifar(20, num_classes, in_channels)
