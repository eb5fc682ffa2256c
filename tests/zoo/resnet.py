"""ResNet as torchvision writes it: BasicBlocks, a 1x1 downsample where the shape changes,
``out += identity``, layers built by ``_make_layer``."""

import torch
from torch import nn


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(1, 1, 1), widths=(8, 16, 32), num_classes=10, in_chans=1):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)                              # (B, 8, 16, 16)
        x = self.layer2(x)                              # (B, 16, 8, 8)
        x = self.layer3(x)                              # (B, 32, 4, 4)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build():
    return ResNet()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    for cin, cout, hw in ((8, 8, 16), (8, 16, 8), (16, 32, 4)):  # one block per stage
        c.conv(cin, cout, 3, hw)
        c.norm(cout)
        c.conv(cout, cout, 3, hw)
        c.norm(cout)
        if cin != cout:  # downsample: 1x1 stride 2 + BN
            c.conv(cin, cout, 1, hw)
            c.norm(cout)
    c.linear(32, 10)
