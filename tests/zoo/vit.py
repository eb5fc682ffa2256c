"""Attention models written the way users and other libraries write them, not torchslim.

Nothing here imports torchslim: these are the third-party architectures the pruning tests
run against. ``ViT`` follows timm's ``vision_transformer`` (one fused qkv Linear reshaped
with ``self.num_heads`` / ``self.head_dim``, class token and position embedding as bare
``nn.Parameter``s); ``TorchViT`` and ``SeqTransformer`` use PyTorch's own
``nn.TransformerEncoderLayer``; ``FixedShapeAttention`` hard-codes its head layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm-style multi-head self-attention: qkv -> heads -> softmax(q k^T) v -> proj."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class LegacyAttention(Attention):
    """Older timm: the head width is derived from the input width, C // num_heads."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class SeparateQKVAttention(nn.Module):
    """Hugging Face naming: query/key/value Linears, attention_head_size, all_head_size."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_attention_heads = num_heads
        self.attention_head_size = dim // num_heads
        self.all_head_size = num_heads * self.attention_head_size
        self.query = nn.Linear(dim, self.all_head_size)
        self.key = nn.Linear(dim, self.all_head_size)
        self.value = nn.Linear(dim, self.all_head_size)
        self.dense = nn.Linear(self.all_head_size, dim)

    def split_heads(self, x):  # (B, N, all_head_size) -> (B, heads, N, head_size)
        new_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        q = self.split_heads(self.query(hidden_states))
        k = self.split_heads(self.key(hidden_states))
        v = self.split_heads(self.value(hidden_states))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (self.all_head_size,))
        return self.dense(context)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, attn=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn if attn is not None else Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as a strided conv."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class ViT(nn.Module):
    """Patch conv, class token, learned positions, pre-norm blocks, head on the class token."""

    def __init__(self, img_size=8, patch=2, in_chans=1, num_classes=10, dim=32, depth=2,
                 num_heads=4, mlp_ratio=2.0, fused=True, attn_cls=None):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, patch)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio,
                  attn=attn_cls(dim, num_heads) if attn_cls else Attention(dim, num_heads, fused))
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class FixedShapeAttention(nn.Module):
    """Attention whose forward spells out its layout as literals: 4 heads of 8 dims."""

    def __init__(self, dim: int = 32, num_heads: int = 4):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * 32)
        self.proj = nn.Linear(32, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, 32))


class TorchViT(nn.Module):
    """The same ViT layout on nn.TransformerEncoderLayer (nn.MultiheadAttention inside)."""

    def __init__(self, img_size=8, patch=2, in_chans=1, num_classes=10, dim=32, depth=2,
                 num_heads=4, mlp_ratio=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, mlp_ratio * dim, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


class SeqTransformer(nn.Module):
    """A text-style classifier on (batch, 16 steps, 32 features) float sequences."""

    def __init__(self, features=32, num_classes=10, depth=2, num_heads=4, seq_len=16):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, seq_len, features))
        layer = nn.TransformerEncoderLayer(features, num_heads, 2 * features, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x):  # (B, 16, 32)
        return self.head(self.encoder(x + self.pos).mean(dim=1))


# --- as a zoo family (tests/test_zoo.py): the timm-style ViT on 16x16 digits ---------------
def build():
    return ViT(img_size=16, patch=4, dim=32, depth=2, num_heads=4)


INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 8


def hand_count(c):
    n = (16 // 4) ** 2 + 1  # 16 patches and the class token
    c.conv(1, 32, 4, 4, bias=True)  # patch embedding: 4x4 patches, a 4x4 map of them
    c.param(32)  # class token
    c.param(n * 32)  # position embedding
    for _ in range(2):
        c.norm(32)
        c.linear(32, 3 * 32, tokens=n)  # fused qkv
        c.attention(32, n)
        c.linear(32, 32, tokens=n)  # proj
        c.norm(32)
        c.linear(32, 64, tokens=n)  # mlp
        c.linear(64, 32, tokens=n)
    c.norm(32)
    c.linear(32, 10)  # head, on the class token only
