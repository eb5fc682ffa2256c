"""Parameters and MACs counted by hand, layer by layer, for the zoo's ``hand_count(c)``.

The conventions are the textbook ones torchslim's ``report`` claims to follow: a MAC is one
multiply-accumulate of a convolution, a linear layer, a recurrent gate or an attention
product (batch 1); biases, normalisation, activations, pooling and element-wise adds cost
none. Each architecture's ``hand_count`` calls these formulas with the widths and the
spatial sizes worked out by hand from its ``forward``, never by running the model.
"""

from __future__ import annotations


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Count:
    """A running total of parameters and MACs."""

    def __init__(self) -> None:
        self.params = 0
        self.macs = 0

    def conv(self, cin: int, cout: int, k, out, *, groups: int = 1, bias: bool = False):
        """A Conv2d whose output is ``out`` (H, W, or one int for a square map)."""
        kh, kw = _pair(k)
        oh, ow = _pair(out)
        weights = cout * (cin // groups) * kh * kw  # each output sees cin/groups inputs
        self.params += weights + (cout if bias else 0)
        self.macs += weights * oh * ow

    def linear(self, fin: int, fout: int, *, tokens: int = 1, bias: bool = True):
        """A Linear applied to ``tokens`` vectors (positions of a sequence or of an NHWC map)."""
        self.params += fin * fout + (fout if bias else 0)
        self.macs += fin * fout * tokens

    def norm(self, channels: int):
        """BatchNorm / LayerNorm with an affine weight and bias: parameters, no MACs."""
        self.params += 2 * channels

    def param(self, numel: int):
        """A bare nn.Parameter (layer scale, class token, positional embedding)."""
        self.params += numel

    def embedding(self, vocab: int, dim: int):
        self.params += vocab * dim  # a table look-up: no MACs

    def lstm(self, fin: int, hidden: int, *, steps: int, layers: int = 1):
        """A stacked LSTM: four gates, each an input and a recurrent product per step."""
        for layer in range(layers):
            inp = fin if layer == 0 else hidden
            weights = 4 * hidden * (inp + hidden)
            self.params += weights + 2 * 4 * hidden  # b_ih and b_hh
            self.macs += weights * steps

    def attention(self, dim: int, length: int):
        """Scaled dot-product attention over ``length`` tokens of width ``dim`` (all heads
        together): Q K^T is length^2 * dim, and weights times V is length^2 * dim again.
        The Q/K/V and output projections are counted as linears."""
        self.macs += 2 * length * length * dim
