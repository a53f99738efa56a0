"""MobileNetV2 for 32x32 inputs (stride-1 stem and first stages, as common CIFAR variants)."""

from __future__ import annotations

from torch import nn

from qsearch.models.registry import ModelSplit, check_granularity, register_model, sequential_split

# (expansion, out_channels, repeats, stride) — ImageNet strides with the first two
# downsamplings removed for 32x32 inputs.
CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
       (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2Cifar(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True)
        )
        blocks, cin = [], 32
        for t, c, n, s in CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, t, s if i == 0 else 1))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.head(self.features(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


def mbv2_groups(
    prefix: str, repeats: list[int], granularity: str, first: int = 0
) -> list[list[str]]:
    """Inverted-residual names ``{prefix}{k}`` (k from ``first``) grouped per CFG stage, or
    one per block."""
    check_granularity(granularity)
    names = [f"{prefix}{k}" for k in range(first, first + sum(repeats))]
    if granularity == "block":
        return [[n] for n in names]
    groups, start = [], 0
    for n in repeats:
        groups.append(names[start:start + n])
        start += n
    return groups


def split_mobilenetv2_cifar(model: nn.Module, granularity: str) -> ModelSplit:
    """Seven CFG stages, or each inverted residual; the stem joins the first block and the
    1x1 conv to 1280 channels belongs to the head."""
    groups: list[list] = mbv2_groups("features.", [n for _, _, n, _ in CFG], granularity)
    groups[0] = ["stem", *groups[0]]
    return sequential_split(model, groups, ["head", "pool", nn.Flatten(1), "classifier"])


@register_model("mobilenetv2", description="MobileNetV2, CIFAR variant, 2.2M params",
                input_hint="3x32x32", split=split_mobilenetv2_cifar)
def mobilenetv2(num_classes: int, in_channels: int) -> nn.Module:
    return MobileNetV2Cifar(num_classes, in_channels)
