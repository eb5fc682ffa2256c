"""SqueezeNet 1.1 as torchvision writes it: Fire modules (1x1 squeeze, then 1x1 and 3x3
expands concatenated), a 1x1 conv classifier and global pooling."""

import torch
from torch import nn


class Fire(nn.Module):
    def __init__(self, inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            Fire(16, 8, 16, 16),
        )
        final_conv = nn.Conv2d(32, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.2), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.features(x)                            # (B, 32, 4, 4)
        return torch.flatten(self.classifier(x), 1)


def build():
    return SqueezeNet()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 10


def hand_count(c):
    c.conv(1, 16, 3, 16, bias=True)
    for cin, squeeze, expand, hw in ((16, 4, 8, 8), (16, 4, 8, 8), (16, 8, 16, 4)):
        c.conv(cin, squeeze, 1, hw, bias=True)
        c.conv(squeeze, expand, 1, hw, bias=True)
        c.conv(squeeze, expand, 3, hw, bias=True)
    c.conv(32, 10, 1, 4, bias=True)
