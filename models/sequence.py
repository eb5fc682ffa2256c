"""Sequence models that read an image row by row, so one (B, C, H, W) pipeline feeds them too.

Each of the H rows is one token / time step whose features are its C * W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..compress.errors import UsageError
from .registry import register_model


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, C * W): one token per image row."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, h, c * w)


class RowTransformer(nn.Module):
    """Row tokens -> Linear embed + learned positions -> pre-norm encoder -> mean pool -> Linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: Sequence[int],
        d_model: int,
        depth: int,
        heads: int,
        mlp_ratio: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise UsageError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        h, w = input_size
        self.embed = nn.Linear(in_channels * w, d_model)
        self.pos = nn.Parameter(torch.zeros(1, h, d_model))
        nn.init.trunc_normal_(self.pos, std=0.02)
        # activation as a module (not F.gelu) so the pickled model holds only nn classes;
        # pre-norm trains more stably at these small sizes without warm-up.
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            mlp_ratio * d_model,
            dropout,
            activation=nn.GELU(),
            batch_first=True,
            norm_first=True,
        )
        # nested tensors only help with padding masks, which row tokens never have
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(_rows(x)) + self.pos  # (B, H, d_model)
        tokens = self.encoder(tokens)
        return self.head(self.norm(tokens.mean(dim=1)))  # (B, num_classes)


class RowLSTM(nn.Module):
    """Rows as time steps -> LSTM -> last layer's final hidden state -> Linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        input_size: Sequence[int],
        hidden: int,
        layers: int,
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_channels * input_size[1], hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(_rows(x))  # h_n: (layers, B, hidden)
        return self.head(h_n[-1])  # (B, num_classes)


@register_model(default_size=(8, 8))
def transformer(
    *,
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    d_model: int = 128,
    depth: int = 4,
    heads: int = 4,
) -> nn.Module:
    """Transformer encoder over image rows (d_model 128, 4 layers, 4 heads), ~0.54 M."""
    return RowTransformer(num_classes, in_channels, input_size, d_model, depth, heads)


@register_model(default_size=(8, 8))
def transformer_tiny(*, num_classes: int, in_channels: int, input_size: Sequence[int]) -> nn.Module:
    """Transformer encoder over image rows (d_model 16, 2 layers, 2 heads): for tests."""
    return RowTransformer(num_classes, in_channels, input_size, 16, 2, 2)


@register_model(default_size=(8, 8))
def lstm(
    *,
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    hidden: int = 128,
    layers: int = 2,
) -> nn.Module:
    """LSTM over image rows (2 layers of 128), last hidden state -> Linear, ~0.2 M."""
    return RowLSTM(num_classes, in_channels, input_size, hidden, layers)


@register_model(default_size=(8, 8))
def lstm_tiny(*, num_classes: int, in_channels: int, input_size: Sequence[int]) -> nn.Module:
    """One-layer LSTM of 32 units over image rows: for tests."""
    return RowLSTM(num_classes, in_channels, input_size, 32, 1)
