"""VGG with BatchNorm as torchvision writes it: ``make_layers`` from a config list, a
Sequential classifier behind ``torch.flatten``."""

import torch
from torch import nn

CFG = [8, "M", 16, "M", 32, 32, "M"]


def make_layers(cfg, in_channels=1):
    layers = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1),
                       nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features, num_classes=10, dropout=0.3):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(32 * 2 * 2, 64), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.avgpool(self.features(x))              # (B, 32, 2, 2)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build():
    return VGG(make_layers(CFG))


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3


def hand_count(c):
    for cin, cout, hw in ((1, 8, 16), (8, 16, 8), (16, 32, 4), (32, 32, 4)):
        c.conv(cin, cout, 3, hw, bias=True)
        c.norm(cout)
    c.linear(128, 64)
    c.linear(64, 10)
