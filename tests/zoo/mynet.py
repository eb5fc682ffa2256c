"""FaultNet: a user's own CNN, as in issue 10 (4 ConvBN blocks, functional relu/max_pool)."""

import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FaultNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.block1 = ConvBN(1, width)
        self.block2 = ConvBN(width, 2 * width)
        self.block3 = ConvBN(2 * width, 4 * width)
        self.block4 = ConvBN(4 * width, 4 * width)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width * 2 * 2, num_classes)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.block1(x)
        x = F.max_pool2d(self.block2(x), 2)             # (B, 16, 8, 8)
        x = F.max_pool2d(self.block3(x), 2)             # (B, 32, 4, 4)
        x = F.max_pool2d(self.block4(x), 2)             # (B, 32, 2, 2)
        x = x.view(x.size(0), -1)
        return self.fc(self.dropout(x))


def build():
    return FaultNet()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 4


def hand_count(c):
    for cin, cout, hw in ((1, 8, 16), (8, 16, 16), (16, 32, 8), (32, 32, 4)):
        c.conv(cin, cout, 3, hw)
        c.norm(cout)
    c.linear(32 * 2 * 2, 10)
