"""EfficientNet-style MBConv, written the way EfficientNet-PyTorch does: functional SiLU and
sigmoid in ``forward``, squeeze-excitation on ``F.adaptive_avg_pool2d``, a skip add."""

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.se_reduce = nn.Conv2d(channels, squeezed, 1)
        self.se_expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.se_expand(F.silu(self.se_reduce(s)))
        return torch.sigmoid(s) * x


class MBConvBlock(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand_ratio, se_ratio=0.25):
        super().__init__()
        hidden = cin * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2,
                                         groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden)
        self._se = SqueezeExcite(hidden, max(1, int(cin * se_ratio)))
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout)
        self.id_skip = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if self.has_expand:
            x = F.silu(self._bn0(self._expand_conv(x)))
        x = F.silu(self._bn1(self._depthwise_conv(x)))
        x = self._se(x)
        x = self._bn2(self._project_conv(x))
        if self.id_skip:
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    # cin, cout, kernel, stride, expansion
    BLOCKS = [(8, 8, 3, 1, 1), (8, 12, 3, 2, 4), (12, 12, 5, 1, 4), (12, 16, 3, 2, 4)]

    def __init__(self, num_classes=10, head=64):
        super().__init__()
        self._conv_stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList(MBConvBlock(*b) for b in self.BLOCKS)
        self._conv_head = nn.Conv2d(16, head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(head, num_classes)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = F.silu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)                                # ... (B, 16, 4, 4)
        x = F.silu(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(start_dim=1)
        return self._fc(self._dropout(x))


def build():
    return EfficientNet()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3
LR = 1e-2


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    hw = 16
    for cin, cout, k, stride, t in ((8, 8, 3, 1, 1), (8, 12, 3, 2, 4), (12, 12, 5, 1, 4),
                                    (12, 16, 3, 2, 4)):
        hidden, out_hw = cin * t, hw // stride
        if t != 1:
            c.conv(cin, hidden, 1, hw)
            c.norm(hidden)
        c.conv(hidden, hidden, k, out_hw, groups=hidden)
        c.norm(hidden)
        c.conv(hidden, cin // 4, 1, 1, bias=True)  # SE on the pooled map
        c.conv(cin // 4, hidden, 1, 1, bias=True)
        c.conv(hidden, cout, 1, out_hw)
        c.norm(cout)
        hw = out_hw
    c.conv(16, 64, 1, 4)
    c.norm(64)
    c.linear(64, 10)
