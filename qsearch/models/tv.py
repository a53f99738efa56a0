"""torchvision ImageNet models (random init; no weights are downloaded).

torchvision is imported when one of them is built, not with :mod:`qsearch.models`: the import
(which pulls in torch._dynamo) would otherwise cost every trial process ~1 s, whatever model it
trains."""

from __future__ import annotations

from torch import nn

from qsearch.models.mobilenetv2_cifar import mbv2_groups
from qsearch.models.registry import ModelSplit, check_granularity, register_model, sequential_split


def _first_conv(model: nn.Module, attr_path: str, in_channels: int) -> None:
    if in_channels == 3:
        return
    parent_path, _, name = attr_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old: nn.Conv2d = getattr(parent, name)
    setattr(parent, name, nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                                    old.padding, bias=old.bias is not None))


def split_tv_resnet(model: nn.Module, granularity: str) -> ModelSplit:
    """Stages layer1..4, or every residual block; the stem (with max-pool) joins the first."""
    check_granularity(granularity)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    if granularity == "stage":
        taps = stages
    else:
        taps = [f"{s}.{j}" for s in stages for j in range(len(model.get_submodule(s)))]
    groups: list[list] = [["conv1", "bn1", "relu", "maxpool", taps[0]]] + [[t] for t in taps[1:]]
    return sequential_split(model, groups, ["avgpool", nn.Flatten(1), "fc"])


# torchvision MobileNetV2's inverted-residual repeats per stage (features.1 .. features.17).
TV_MBV2_REPEATS = [1, 2, 3, 4, 3, 3, 1]


def split_tv_mobilenet_v2(model: nn.Module, granularity: str) -> ModelSplit:
    """Seven stages, or each inverted residual; features.0 (stem) joins the first block and
    features.18 (1x1 conv to 1280) belongs to the head."""
    groups: list[list] = mbv2_groups("features.", TV_MBV2_REPEATS, granularity, first=1)
    groups[0] = ["features.0", *groups[0]]
    return sequential_split(
        model, groups, ["features.18", nn.AdaptiveAvgPool2d(1), nn.Flatten(1), "classifier"]
    )


@register_model("resnet18", description="torchvision ResNet-18 (ImageNet)", input_hint="3x224x224",
                split=split_tv_resnet)
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    _first_conv(m, "conv1", in_channels)
    return m


@register_model("mobilenet_v2", description="torchvision MobileNetV2 (ImageNet)",
                input_hint="3x224x224", split=split_tv_mobilenet_v2)
def mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    m = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    _first_conv(m, "features.0.0", in_channels)
    return m
