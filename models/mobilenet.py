"""MobileNetV3-style nets (arXiv 1905.02244) sized for 8x8 to 64x64 inputs.

Inverted residuals with depthwise convs, squeeze-and-excitation gated by Hardsigmoid,
ReLU in the early high-resolution blocks and Hardswish in the deeper half, where the
feature maps are small and the costlier nonlinearity pays for itself. The stem keeps
stride 1 (ImageNet's stride-32 layout would reduce an 8x8 input to nothing useful).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 (as MobileNets do), never dropping below 90 %."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _act(name: str) -> nn.Module:
    return nn.Hardswish() if name == "HS" else nn.ReLU()


class SqueezeExcite(nn.Module):
    """Channel attention: pooled feature -> 1x1 reduce -> ReLU -> 1x1 expand -> Hardsigmoid."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        squeezed = _make_divisible(channels / reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))  # (B, C, 1, 1)
        return x * w


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class MBV3Block(nn.Module):
    """[1x1 expand + act] -> kxk depthwise + act -> [SE] -> 1x1 linear projection (+ skip)."""

    def __init__(
        self, c_in: int, k: int, hidden: int, c_out: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers += [*_conv_bn(c_in, hidden, 1, 1), _act(act)]
        layers += [*_conv_bn(hidden, hidden, k, stride, groups=hidden), _act(act)]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += _conv_bn(hidden, c_out, 1, 1)
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


# (kernel, expanded ch, out ch, SE, activation, stride): MobileNetV3-Small's table with
# two of its stride-2 steps removed (total stride 8, not 32) for small images.
V3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
V3_TINY = (
    (3, 16, 8, True, "RE", 2),
    (3, 24, 16, False, "RE", 1),
    (3, 48, 16, True, "HS", 2),
    (3, 48, 24, True, "HS", 1),
)


class MobileNetV3(nn.Module):
    """Stem -> MBV3 blocks -> 1x1 conv -> global pool -> Linear-Hardswish-Dropout-Linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        blocks: Sequence[Sequence],
        stem: int,
        last: int,
        head: int,
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        c_in = _make_divisible(stem * width_mult)
        layers: list[nn.Module] = [*_conv_bn(in_channels, c_in, 3, 1), nn.Hardswish()]
        for k, hidden, c_out, se, act, stride in blocks:
            hidden, c_out = (
                _make_divisible(hidden * width_mult),
                _make_divisible(c_out * width_mult),
            )
            layers.append(MBV3Block(c_in, k, hidden, c_out, se, act, stride))
            c_in = c_out
        last = _make_divisible(last * width_mult)
        layers += [*_conv_bn(c_in, last, 1, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(last, head),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(head, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))  # (B, num_classes)


@register_model(default_size=(32, 32))
def mobilenetv3_small(
    *, num_classes: int, in_channels: int, input_size: Sequence[int], width_mult: float = 1.0
) -> nn.Module:
    """MobileNetV3-Small layout (SE, Hardswish) at total stride 8 for 8-64 px inputs, ~1.5 M."""
    del input_size  # global pooling: any size works
    return MobileNetV3(num_classes, in_channels, V3_SMALL, 16, 576, 1024, width_mult)


@register_model(default_size=(8, 8))
def mobilenet_tiny(*, num_classes: int, in_channels: int, input_size: Sequence[int]) -> nn.Module:
    """Four MobileNetV3 blocks (8-24 ch, SE, Hardswish), ~16 k params: for tests."""
    del input_size
    return MobileNetV3(num_classes, in_channels, V3_TINY, 8, 64, 64)
