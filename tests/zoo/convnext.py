"""ConvNeXt as its authors write it: a depthwise 7x7 conv, LayerNorm over channels by
permuting to (B, H, W, C), an inverted MLP with GELU, a layer-scale ``gamma`` parameter and
a residual add; the stem and downsampling use a channels-first LayerNorm of their own."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """LayerNorm over channels for (B, C, H, W) input, as in the official ConvNeXt code."""

    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)                       # (B, C, H, W) -> (B, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    def __init__(self, in_chans=1, num_classes=10, depths=(1, 1), dims=(16, 32)):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=2, stride=2), LayerNorm(dims[0]))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[Block(dim) for _ in range(depth)])
                                    for dim, depth in zip(dims, depths, strict=True))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.constant_(m.bias, 0)

    def forward(self, x):                               # (B, 1, 16, 16)
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))                          # (B, 16, 8, 8), then (B, 32, 4, 4)
        x = self.norm(x.mean([-2, -1]))
        return self.head(F.dropout(x, 0.1, self.training))


def build():
    return ConvNeXt()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 4
LR = 1e-2


def hand_count(c):
    c.conv(1, 16, 2, 8, bias=True)  # stem: 2x2 stride 2
    c.norm(16)
    for dim, hw in ((16, 8), (32, 4)):
        if dim == 32:  # downsample: LayerNorm, then 2x2 stride 2
            c.norm(16)
            c.conv(16, 32, 2, hw, bias=True)
        c.conv(dim, dim, 7, hw, groups=dim, bias=True)  # depthwise 7x7
        c.norm(dim)
        c.linear(dim, 4 * dim, tokens=hw * hw)  # pointwise MLP on (B, H, W, C)
        c.linear(4 * dim, dim, tokens=hw * hw)
        c.param(dim)  # layer scale gamma
    c.norm(32)
    c.linear(32, 10)
