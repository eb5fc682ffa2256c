"""An LSTM text classifier: token ids -> Embedding -> 2-layer LSTM -> Linear on the last
layer's final hidden state."""

from torch import nn


class TextLSTM(nn.Module):
    def __init__(self, vocab_size=50, embed_dim=16, hidden=32, num_layers=2, num_classes=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, batch_first=True,
                            dropout=0.1)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens):                          # (B, 20) int64
        _, (h, _) = self.lstm(self.embedding(tokens))   # h: (layers, B, hidden)
        return self.fc(h[-1])


def build():
    return TextLSTM()


# --- how tests/test_zoo.py uses this family ---
INPUTS = ["--input", "1,20:int64"]
DATA = "tokens"
EPOCHS = 8


def hand_count(c):
    c.embedding(50, 16)
    c.lstm(16, 32, steps=20, layers=2)
    c.linear(32, 4)
