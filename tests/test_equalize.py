"""Depthwise -> pointwise equalization before int8: same outputs, balanced ranges, less error."""

from __future__ import annotations

import copy

import torch
from torch import nn

from torchslim.compress import onnx_quant as oq
from torchslim.compress.equalize import equalize, separable_pairs
from torchslim.compress.io import ModelMeta
from torchslim.compress.quantize import QuantizeConfig, quantize_model


def _imbalanced(relu_between: bool = False) -> nn.Module:
    """A stem, then a depthwise -> pointwise pair whose channel scales span 100x, the way
    training leaves a swapped model (the pair's product is an ordinary function)."""
    torch.manual_seed(0)
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
    pw = nn.Conv2d(8, 12, 1)
    with torch.no_grad():
        spread = torch.logspace(-1, 1, 8)  # 0.1 .. 10
        dw.weight.mul_(spread.view(-1, 1, 1, 1))
        dw.bias.mul_(spread)
        pw.weight.div_(spread.view(1, -1, 1, 1))
    mid = [nn.ReLU()] if relu_between else []
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), dw, *mid, pw, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10)).eval()


def _ranges(model: nn.Module, x: torch.Tensor):
    dw, pw = model[2], model[-5]
    feats = {}
    h = dw.register_forward_hook(lambda _m, _i, o: feats.setdefault("dw", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return feats["dw"].abs().amax(dim=(0, 2, 3)), pw.weight.abs().amax(dim=(0, 2, 3))


def test_equalize_keeps_outputs_and_balances_both_ranges(digits):
    x = digits.train.tensors[0][:128]
    for relu in (False, True):
        model = _imbalanced(relu)
        before = model(x).detach()
        eq, names = equalize(model, (x,))
        assert names == ["2"] and eq is not model  # the input model is left as it was
        assert torch.allclose(model(x), before)
        assert torch.allclose(eq(x), before, rtol=1e-4, atol=1e-5)
        act, col = _ranges(eq, x)
        # s_i = sqrt(a_i / w_i): the depthwise output range equals the column range
        assert torch.allclose(act, col, rtol=1e-4)
        act0, col0 = _ranges(model, x)
        assert (act.max() / act.min()) < 0.2 * (act0.max() / act0.min())


def test_pairs_need_nothing_but_a_relu_between():
    model = _imbalanced()
    assert [n for n, _, _ in separable_pairs(model)] == ["2"]
    with_bn = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1))
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 1))  # not depthwise
    for m in (with_bn, plain):
        assert separable_pairs(m) == []
        assert equalize(m, (torch.randn(2, m[0].in_channels, 8, 8),)) == (m, [])


def _int8_error(model, digits, tmp_path, equalize_pairs: bool) -> float:
    out = tmp_path / f"eq{int(equalize_pairs)}.onnx"
    meta = ModelMeta(input_shape=(1, 8, 8))
    quantize_model(copy.deepcopy(model), QuantizeConfig(mode="static", equalize=equalize_pairs),
                   out_path=out, data=digits, meta=meta)
    x = digits.val.tensors[0]
    ref = model(x).detach()
    return float((oq.OnnxRunner(out)(x) - ref).norm() / ref.norm())


def test_equalized_static_int8_is_closer_to_fp32(digits, tmp_path):
    model = _imbalanced()
    plain = _int8_error(model, digits, tmp_path, False)
    balanced = _int8_error(model, digits, tmp_path, True)
    assert balanced < 0.5 * plain, (balanced, plain)
