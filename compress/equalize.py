"""Equalize depthwise -> pointwise pairs before int8: the same function, quantizable ranges.

A depthwise conv followed directly by a 1x1 conv (what `swap` makes, and MobileNetV1
blocks without a norm between) computes ``P @ (d_i * x_i)``: scaling depthwise channel i by
1/s_i and pointwise input column i by s_i leaves the output unchanged (exactly, up to
float rounding; a ReLU between is fine for s_i > 0, since relu(x / s) = relu(x) / s).
Training leaves those scales wildly unequal across channels: on PDModel swapped, pruned and
distilled, one pointwise layer's columns span 0.5 to 5.7 and its per-output-channel int8
weights alone cost it 13.5 dB of SQNR; static int8 of that model lost 15 points.

The pass moves range between the depthwise output (quantized per tensor) and the pointwise
columns (quantized per output channel) so that both are balanced: s_i = sqrt(a_i / w_i), with
a_i the calibration range of depthwise channel i and w_i the range of column i, which makes
both sqrt(a_i * w_i). It is cross-layer equalization (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019) with SmoothQuant's
activation-aware balance (Xiao et al., 2023, alpha = 0.5). ONNX Runtime has no such pass for
convolutions (its SmoothQuant option needs Intel Neural Compressor and targets MatMul).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .inputs import call_hooked


def separable_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.Conv2d]]:
    """(name, depthwise, pointwise) for each depthwise conv followed in the same
    nn.Sequential by a 1x1 conv, with at most a ReLU between."""
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (n, a) in enumerate(kids):
            rest = [m for _, m in kids[i + 1 : i + 3]]
            if rest and isinstance(rest[0], nn.ReLU) and len(rest) > 1:
                rest = rest[1:]
            b = rest[0] if rest else None
            if _depthwise(a) and _pointwise(b) and b.in_channels == a.out_channels:
                pairs.append((f"{name}.{n}" if name else n, a, b))
    return pairs


def _depthwise(m) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels
            and m.groups > 1)


def _pointwise(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)


def equalize(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every depthwise -> pointwise pair balanced (same outputs),
    ranges measured on the calibration ``inputs`` (one batch, a tensor per model input); the
    names of the pairs. The model is returned unchanged (not copied) when it has none."""
    if not separable_pairs(model):
        return model, []
    model = copy.deepcopy(model).eval()
    pairs = separable_pairs(model)
    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, _i, out):
            r = out.detach().abs().amax(dim=(0, 2, 3))
            ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r
        return fn

    call_hooked(model, inputs, [dw.register_forward_hook(hook(name)) for name, dw, _ in pairs])
    with torch.no_grad():
        for name, dw, pw in pairs:
            if name not in ranges:  # not on the path the inputs take: nothing to measure
                continue
            act = ranges[name]
            col = pw.weight.abs().amax(dim=(0, 2, 3))
            live = (act > 1e-12) & (col > 1e-12)
            s = torch.ones_like(act)
            s[live] = (act[live] / col[live]).sqrt()
            dw.weight.div_(s.view(-1, 1, 1, 1))
            if dw.bias is not None:
                dw.bias.div_(s)
            pw.weight.mul_(s.view(1, -1, 1, 1))
    return model, [name for name, _, _ in pairs if name in ranges]
