"""A user's one-file script: the class lives in ``__main__``, so its pickle names
``__main__.ScriptNet``, which no other process can import."""

import torch
from torch import nn


class ScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


if __name__ == "__main__":
    torch.save(ScriptNet(), "scriptnet.pt")
