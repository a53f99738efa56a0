"""A three-conv CNN sized for 8x8 digits: trains to >95% in seconds on a CPU."""

from __future__ import annotations

from torch import nn

from qsearch.models.registry import ModelSplit, check_granularity, register_model, sequential_split


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.stage1 = conv_bn_relu(in_channels, width)
        self.stage2 = nn.Sequential(conv_bn_relu(width, 2 * width), nn.MaxPool2d(2))
        self.stage3 = conv_bn_relu(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).flatten(1))


def split_tiny_cnn(model: nn.Module, granularity: str) -> ModelSplit:
    """Three blocks at either granularity: each stage holds exactly one conv."""
    check_granularity(granularity)
    return sequential_split(model, [["stage1"], ["stage2"], ["stage3"]],
                            ["pool", nn.Flatten(1), "fc"])


@register_model("tiny-cnn", description="3-conv CNN for 8x8 digits", input_hint="1x8x8",
                split=split_tiny_cnn)
def tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return TinyCNN(num_classes, in_channels)
