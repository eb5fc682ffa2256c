"""Multi-layer perceptron on the flattened image: the simplest pruning/quantization target."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] x len(hidden) -> Linear."""

    def __init__(
        self, num_classes: int, in_features: int, hidden: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, num_classes)


@register_model(default_size=(8, 8))
def mlp(
    *,
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    hidden: int = 256,
    dropout: float = 0.0,
) -> nn.Module:
    """MLP with two hidden layers of 256 on the flattened image (~85 k params at 8x8)."""
    h, w = input_size
    return MLP(num_classes, in_channels * h * w, (hidden, hidden), dropout)


@register_model(default_size=(8, 8))
def mlp_tiny(*, num_classes: int, in_channels: int, input_size: Sequence[int]) -> nn.Module:
    """MLP with two hidden layers of 32 (~3.5 k params at 8x8): for tests."""
    h, w = input_size
    return MLP(num_classes, in_channels * h * w, (32, 32))
