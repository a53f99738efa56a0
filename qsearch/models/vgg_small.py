"""VGG-Small for CIFAR (the LQ-Nets / LSQ benchmark network)."""

from __future__ import annotations

from torch import nn

from qsearch.models.registry import ModelSplit, check_granularity, register_model, sequential_split


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stage1 = nn.Sequential(*_conv(in_channels, 128), *_conv(128, 128), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*_conv(128, 256), *_conv(256, 256), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*_conv(256, 512), *_conv(512, 512), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(512 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.pool(x).flatten(1))


def split_vgg_small(model: nn.Module, granularity: str) -> ModelSplit:
    """Three stages, or six conv-BN-ReLU blocks (each pooling joins the conv before it)."""
    check_granularity(granularity)
    if granularity == "stage":
        groups: list[list] = [["stage1"], ["stage2"], ["stage3"]]
    else:
        groups = []
        for s in ("stage1", "stage2", "stage3"):
            groups += [[f"{s}.{i}" for i in range(3)], [f"{s}.{i}" for i in range(3, 7)]]
    return sequential_split(model, groups, ["pool", nn.Flatten(1), "fc"])


@register_model("vgg-small", description="VGG-Small for CIFAR, 4.7M params", input_hint="3x32x32",
                split=split_vgg_small)
def vgg_small(num_classes: int, in_channels: int) -> nn.Module:
    return VGGSmall(num_classes, in_channels)
