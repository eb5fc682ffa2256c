"""MobileNetV3 (small-style) as torchvision writes it: inverted residuals with
squeeze-excitation (avgpool, 1x1 convs, hardsigmoid gate multiplied in) and hardswish."""

import torch
from torch import nn


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels, squeeze_channels):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def _scale(self, x):
        scale = self.activation(self.fc1(self.avgpool(x)))
        return self.scale_activation(self.fc2(scale))

    def forward(self, x):
        return self._scale(x) * x


def conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.Hardswish):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, k, expanded, cout, use_se, act, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, expanded // 4))
        layers.append(conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(nn.Module):
    # in, kernel, expanded, out, SE, activation, stride
    SETTING = [(8, 3, 8, 8, True, nn.ReLU, 2), (8, 3, 24, 12, False, nn.ReLU, 2),
               (12, 5, 36, 12, True, nn.Hardswish, 1)]

    def __init__(self, num_classes=10, last_channel=64):
        super().__init__()
        layers = [conv_bn_act(1, 8, 3)]
        layers += [InvertedResidual(*s) for s in self.SETTING]
        layers.append(conv_bn_act(12, 48, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(48, last_channel), nn.Hardswish(inplace=True), nn.Dropout(0.2),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x):                               # (B, 1, 16, 16)
        x = self.avgpool(self.features(x))              # (B, 48, 1, 1)
        return self.classifier(torch.flatten(x, 1))


def build():
    return MobileNetV3()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input-shape", "1,16,16"]
DATA = "digits16"
EPOCHS = 3
LR = 1e-2


def _se(c, ch):
    c.conv(ch, ch // 4, 1, 1, bias=True)  # on the pooled 1x1 map
    c.conv(ch // 4, ch, 1, 1, bias=True)


def hand_count(c):
    c.conv(1, 8, 3, 16)
    c.norm(8)
    # block 1: 8 -> 8, no expansion, depthwise 3x3 stride 2, SE
    c.conv(8, 8, 3, 8, groups=8)
    c.norm(8)
    _se(c, 8)
    c.conv(8, 8, 1, 8)
    c.norm(8)
    # block 2: 8 -> 24 -> 12, depthwise 3x3 stride 2
    c.conv(8, 24, 1, 8)
    c.norm(24)
    c.conv(24, 24, 3, 4, groups=24)
    c.norm(24)
    c.conv(24, 12, 1, 4)
    c.norm(12)
    # block 3: 12 -> 36 -> 12, depthwise 5x5, SE, residual
    c.conv(12, 36, 1, 4)
    c.norm(36)
    c.conv(36, 36, 5, 4, groups=36)
    c.norm(36)
    _se(c, 36)
    c.conv(36, 12, 1, 4)
    c.norm(12)
    c.conv(12, 48, 1, 4)
    c.norm(48)
    c.linear(48, 64)
    c.linear(64, 10)
