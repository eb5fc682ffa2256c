"""A model with two inputs: an image and a feature vector, fused by concatenation."""

import torch
import torch.nn.functional as F
from torch import nn


class ImageBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):                               # (B, 1, 16, 16)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return x.flatten(1)                             # (B, 16 * 4 * 4)


class FusionNet(nn.Module):
    def __init__(self, num_features=8, num_classes=10):
        super().__init__()
        self.image = ImageBranch()
        # not `self.meta`: torch.export cannot rebuild a submodule named like a GraphModule
        # attribute (meta, graph, code), so .onnx/.pt2 would be refused (test_artifact.py)
        self.tabular = nn.Sequential(nn.Linear(num_features, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(256 + 16, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, image, features):                 # (B, 1, 16, 16), (B, 8)
        return self.head(torch.cat([self.image(image), self.tabular(features)], dim=1))


def build():
    return FusionNet()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input", "1,1,16,16", "--input", "1,8"]
DATA = "pair"
EPOCHS = 3


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    c.conv(8, 16, 3, 8)
    c.norm(16)
    c.linear(8, 16)
    c.linear(256 + 16, 32)
    c.linear(32, 10)
