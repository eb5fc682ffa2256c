"""ShuffleNetV2 as torchvision writes it: channel split (``chunk``), two branches
concatenated, and a channel shuffle by ``view`` / ``transpose`` / ``view``."""

import torch
from torch import nn


def channel_shuffle(x, groups):
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


def depthwise_conv(channels, stride):
    return nn.Conv2d(channels, channels, 3, stride, 1, bias=False, groups=channels)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                depthwise_conv(inp, stride), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, bias=False), nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
            depthwise_conv(branch_features, stride), nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_out=(8, 16, 32, 64), num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, stages_out[0], 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(stages_out[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        cin = stages_out[0]
        for name, cout in zip(("stage2", "stage3"), stages_out[1:3], strict=True):
            setattr(self, name, nn.Sequential(InvertedResidual(cin, cout, 2),
                                              InvertedResidual(cout, cout, 1)))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, stages_out[-1], 1, bias=False),
                                   nn.BatchNorm2d(stages_out[-1]), nn.ReLU(inplace=True))
        self.fc = nn.Linear(stages_out[-1], num_classes)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.maxpool(self.conv1(x))                 # (B, 8, 8, 8)
        x = self.stage3(self.stage2(x))                 # (B, 32, 2, 2)
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


def build():
    return ShuffleNetV2()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3
LR = 1e-2


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    for cin, cout, hw in ((8, 16, 8), (16, 32, 4)):  # hw: the stage's input size
        half, out = cout // 2, hw // 2
        c.conv(cin, cin, 3, out, groups=cin)  # branch1: depthwise stride 2, then 1x1
        c.norm(cin)
        c.conv(cin, half, 1, out)
        c.norm(half)
        c.conv(cin, half, 1, hw)  # branch2: 1x1, depthwise stride 2, 1x1
        c.norm(half)
        c.conv(half, half, 3, out, groups=half)
        c.norm(half)
        c.conv(half, half, 1, out)
        c.norm(half)
        c.conv(half, half, 1, out)  # the stride-1 unit's branch2 on half the channels
        c.norm(half)
        c.conv(half, half, 3, out, groups=half)
        c.norm(half)
        c.conv(half, half, 1, out)
        c.norm(half)
    c.conv(32, 64, 1, 2)
    c.norm(64)
    c.linear(64, 10)
