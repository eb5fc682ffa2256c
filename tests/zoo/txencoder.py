"""A Transformer-encoder classifier over (B, 16, 32) sequences: a linear input projection,
a learned positional embedding (an nn.Parameter), nn.TransformerEncoder, mean pooling."""

import torch
from torch import nn


class SeqTransformer(nn.Module):
    def __init__(self, features=32, d_model=32, heads=4, ff=64, layers=2, length=16,
                 num_classes=10):
        super().__init__()
        self.proj = nn.Linear(features, d_model)
        self.pos = nn.Parameter(torch.zeros(1, length, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):                               # (B, 16, 32)
        x = self.encoder(self.proj(x) + self.pos)
        return self.head(self.norm(x.mean(dim=1)))


def build():
    return SeqTransformer()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input", "1,16,32"]
DATA = "rows"
EPOCHS = 6


def hand_count(c):
    c.linear(32, 32, tokens=16)
    c.param(16 * 32)
    for _ in range(2):
        c.linear(32, 3 * 32, tokens=16)  # in_proj: Q, K, V
        c.attention(32, 16)
        c.linear(32, 32, tokens=16)  # out_proj
        c.linear(32, 64, tokens=16)
        c.linear(64, 32, tokens=16)
        c.norm(32)
        c.norm(32)
    c.norm(32)
    c.linear(32, 10)
