"""RegNetX-style as torchvision writes it: bottleneck blocks whose 3x3 conv is grouped
(fixed group width), a projection shortcut, ``F.relu(shortcut + f(x))``."""

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BottleneckTransform(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width):
        super().__init__()
        self.a = conv_bn(w_in, w_out, 1)
        self.b = conv_bn(w_out, w_out, 3, stride, groups=w_out // group_width)
        self.c = conv_bn(w_out, w_out, 1, relu=False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width=8):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = conv_bn(w_in, w_out, 1, stride, relu=False)
        self.f = BottleneckTransform(w_in, w_out, stride, group_width)

    def forward(self, x):
        shortcut = self.proj(x) if self.proj is not None else x
        return F.relu(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self, widths=(16, 32), depths=(1, 2), num_classes=10):
        super().__init__()
        self.stem = conv_bn(1, 8, 3)
        stages, w_in = [], 8
        for w, d in zip(widths, depths, strict=True):
            stages.append(nn.Sequential(*[ResBottleneckBlock(w_in if i == 0 else w, w,
                                                             2 if i == 0 else 1)
                                          for i in range(d)]))
            w_in = w
        self.trunk_output = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.trunk_output(self.stem(x))             # (B, 32, 4, 4)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build():
    return RegNet()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3
LR = 1e-2


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    for cin, cout, hw_in, stride in ((8, 16, 16, 2), (16, 32, 8, 2), (32, 32, 4, 1)):
        hw = hw_in // stride
        if cin != cout or stride != 1:
            c.conv(cin, cout, 1, hw)  # projection shortcut
            c.norm(cout)
        c.conv(cin, cout, 1, hw_in)
        c.norm(cout)
        c.conv(cout, cout, 3, hw, groups=cout // 8)  # group width 8
        c.norm(cout)
        c.conv(cout, cout, 1, hw)
        c.norm(cout)
    c.linear(32, 10)
