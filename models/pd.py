"""The seed's partial-discharge classifiers (see SEEDS.md): PDModel and PDLightModel.

Both output LOGITS. The seed ended PDModel with Sigmoid and PDLightModel with Softmax;
torchslim trains with CrossEntropyLoss (which applies log-softmax itself) and
distils from logits, so a final squashing layer would only hurt: argmax is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..compress.errors import TorchslimError
from .registry import register_model


def _flat_features(features: nn.Module, in_channels: int, size: Sequence[int]) -> int:
    """Flatten width after ``features`` for this input size, found by a dummy forward."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, *size))
    except RuntimeError as err:
        raise TorchslimError(
            f"input size {size[0]}x{size[1]} is too small for this network ({err}); "
            "pick a larger input size"
        ) from None
    if out.numel() == 0:
        raise TorchslimError(
            f"input size {size[0]}x{size[1]} shrinks to nothing; pick a larger input size"
        )
    return out[0].numel()


class PDModel(nn.Module):
    """LeNet-5-style baseline: n x [conv3x3 -> ReLU -> maxpool2], flatten, 3 Linear layers."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: Sequence[int],
        channels: Sequence[int] = (32, 64, 128, 256),
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        flat = _flat_features(self.features, in_channels, input_size)
        h1, h2 = hidden
        # The seed puts Dropout between the second Linear and its ReLU; kept as written.
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, h1),
            nn.ReLU(),
            nn.Linear(h1, h2),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, num_classes) logits


def conv_bn_act(
    c_in: int, c_out: int, k: int, stride: int, groups: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN + optional activation, as one Sequential."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, slope: float) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(c_in, hidden, 1, 1, act=nn.LeakyReLU(slope)))
        layers.append(
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.LeakyReLU(slope))
        )
        # No activation after the projection: the "linear bottleneck" keeps information
        # that a ReLU would destroy in the narrow space.
        layers.append(conv_bn_act(hidden, c_out, 1, 1))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


# (expand, out channels, repeats, stride of the first repeat): the seed's table.
PD_LIGHT_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 3, 2))


class PDLightModel(nn.Module):
    """MobileNetV2-style compressed PD model: inverted residuals, pooled feature, 1 Linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        stem: int = 32,
        head: int = 256,
        blocks: Sequence[Sequence[int]] = PD_LIGHT_BLOCKS,
        slope: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(in_channels, stem, 3, 2, act=nn.LeakyReLU(slope))]
        c_in = stem
        for expand, c_out, repeats, stride in blocks:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand, slope))
                c_in = c_out
        layers.append(conv_bn_act(c_in, head, 1, 1, act=nn.LeakyReLU(slope)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(head, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))  # (B, num_classes) logits


@register_model(default_size=(60, 120), min_size=(16, 16))
def pd_model(
    *, num_classes: int, in_channels: int, input_size: Sequence[int], dropout: float = 0.5
) -> nn.Module:
    """Seed baseline PDModel: 4 conv/pool stages (32-256 ch) + flatten + 3 Linear, ~0.73 M."""
    return PDModel(num_classes, in_channels, input_size, dropout=dropout)


@register_model(default_size=(60, 120), min_size=(16, 16))
def pd_tiny(*, num_classes: int, in_channels: int, input_size: Sequence[int]) -> nn.Module:
    """PDModel layout at 1/8-1/16 width (4-16 ch, hidden 32/16): a fast stand-in for tests."""
    # dropout 0.1: dropping half of a 16-unit layer leaves too little for a model this narrow
    return PDModel(
        num_classes, in_channels, input_size, channels=(4, 8, 8, 16), hidden=(32, 16), dropout=0.1
    )


@register_model(default_size=(60, 120))
def pd_light(
    *, num_classes: int, in_channels: int, input_size: Sequence[int], slope: float = 0.2
) -> nn.Module:
    """Seed PDLightModel: MobileNetV2-style, LeakyReLU(0.2), pooled 256-d feature, ~0.2 M."""
    del input_size  # fully convolutional + global pool: any size >= 1x1 works
    return PDLightModel(num_classes, in_channels, slope=slope)
