"""ResNet with BasicBlocks, stem adapted to small inputs (3x3 stride-1 conv, no max-pool).

ImageNet's 7x7 stride-2 stem + max-pool would shrink an 8x8 digit to 2x2 before the first
block; small-image ResNets (CIFAR-style) keep full resolution in the stem instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model


def _width(c: int, mult: float) -> int:
    return max(1, int(round(c * mult)))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN; the input (projected by a 1x1 conv when its shape changes) is added."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()  # separate module so per-layer tools see two activations
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem -> stages of BasicBlocks (stride 2 from the second stage on) -> pool -> Linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, (c_out, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = [
                BasicBlock(c_in if j == 0 else c_out, c_out, 2 if i and not j else 1)
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, C_last, H / 2^(stages-1), W / 2^(stages-1))
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)


def _resnet(num_classes, in_channels, widths, depths, width_mult) -> ResNet:
    widths = [_width(c, width_mult) for c in widths]
    return ResNet(num_classes, in_channels, widths, list(depths))


@register_model(default_size=(8, 8))
def resnet_tiny(*, num_classes: int, in_channels: int, input_size: Sequence[int]) -> nn.Module:
    """Two-stage ResNet, 8-16 channels, one block each (~5 k params): for tests."""
    del input_size  # global pooling: any size works
    return _resnet(num_classes, in_channels, (8, 16), (1, 1), 1.0)


@register_model(default_size=(32, 32))
def resnet_small(
    *,
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    width_mult: float = 1.0,
    depths: Sequence[int] = (1, 1, 1, 1),
) -> nn.Module:
    """ResNet with 4 stages of 16-128 channels, one BasicBlock each (~0.3 M params)."""
    del input_size
    return _resnet(num_classes, in_channels, (16, 32, 64, 128), depths, width_mult)


@register_model(default_size=(32, 32))
def resnet18(
    *, num_classes: int, in_channels: int, input_size: Sequence[int], width_mult: float = 1.0
) -> nn.Module:
    """ResNet-18 (64-512 channels, 2-2-2-2 BasicBlocks, ~11 M params), small-input stem."""
    del input_size
    return _resnet(num_classes, in_channels, (64, 128, 256, 512), (2, 2, 2, 2), width_mult)
