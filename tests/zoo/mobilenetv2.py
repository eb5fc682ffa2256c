"""MobileNetV2 as torchvision writes it: inverted residuals (1x1 expand, depthwise 3x3,
linear 1x1 projection), a residual add where the shape allows, ``ConvBNReLU`` as a
Sequential subclass, functional pooling in ``forward``."""

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (blocks), s (first stride), scaled down for 16x16 digits
    SETTING = [[1, 8, 1, 1], [4, 12, 2, 2], [4, 16, 2, 2]]

    def __init__(self, num_classes=10, last_channel=64):
        super().__init__()
        features = [ConvBNReLU(1, 8, stride=1)]
        input_channel = 8
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, t))
                input_channel = c
        features.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.features(x)                            # (B, 64, 4, 4)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build():
    return MobileNetV2()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3
LR = 1e-2


def _block(c, cin, cout, hidden, hw_in, hw_out):
    if hidden != cin:  # expand 1x1
        c.conv(cin, hidden, 1, hw_in)
        c.norm(hidden)
    c.conv(hidden, hidden, 3, hw_out, groups=hidden)  # depthwise
    c.norm(hidden)
    c.conv(hidden, cout, 1, hw_out)  # linear projection
    c.norm(cout)


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    _block(c, 8, 8, 8, 16, 16)      # t=1
    _block(c, 8, 12, 32, 16, 8)     # t=4, stride 2
    _block(c, 12, 12, 48, 8, 8)
    _block(c, 12, 16, 48, 8, 4)     # stride 2
    _block(c, 16, 16, 64, 4, 4)
    c.conv(16, 64, 1, 4)
    c.norm(64)
    c.linear(64, 10)
