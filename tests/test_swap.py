"""Architecture swap: SVD-initialised depthwise-separable convs, hard activations, low rank."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress.data import load_data
from torchslim.compress.errors import TorchslimError, UsageError
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.lowrank import LowRankConfig, factorise_linear, lowrank_model
from torchslim.compress.measure import count_macs
from torchslim.compress.swap import SwapConfig, rank1_factors, swap_model
from torchslim.compress.train import TrainConfig, evaluate, fit
from torchslim.models.registry import create_model

torch.set_num_threads(1)
runner = CliRunner()


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN trained on real digits (8x8): swap errors mean something only on trained
    weights, whose slices have structure that random ones lack."""
    torch.manual_seed(0)
    model = small_cnn()
    result = fit(model, digits, TrainConfig(epochs=6, lr=3e-3, seed=0))
    assert result.best_top1 > 90.0
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_rank1_factors_exact_for_separable_weight():
    # A weight that IS separable (rank 1 per input channel) is reproduced exactly.
    dw = torch.randn(6, 1, 3, 3)
    pw = torch.randn(5, 6, 1, 1)
    w = pw * dw.reshape(1, 6, 3, 3)
    dw2, pw2, err = rank1_factors(w)
    assert err < 1e-5
    torch.testing.assert_close(pw2 * dw2.reshape(1, 6, 3, 3), w, atol=1e-5, rtol=1e-4)


def test_separable_conv_computes_the_rank1_weight():
    # pointwise(depthwise(x)) == conv(x, W_sep): padding, stride and dilation carry over.
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=True)
    model, report = swap_model(nn.Sequential(conv), SwapConfig())
    dw, pw, err = rank1_factors(conv.weight)
    x = torch.randn(2, 8, 11, 13)
    ref = F.conv2d(x, pw * dw.reshape(1, 8, 3, 3), conv.bias, 2, 2, 2)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    assert report.layers[0].rel_error == pytest.approx(err)
    assert model[0].depthwise.groups == 8 and model[0].depthwise.stride == (2, 2)


def test_svd_init_far_closer_than_random(trained, digits):
    x_val, _ = digits.val.tensors
    calib = digits.train.tensors[0][:128]
    ref = trained(x_val)
    svd, rep = swap_model(trained, SwapConfig(min_channels=2), calib)
    rnd, _ = swap_model(trained, SwapConfig(min_channels=2, init="random"))
    err_svd = rel_err(svd.eval()(x_val), ref)
    err_rnd = rel_err(rnd.eval()(x_val), ref)
    # Measured: ~0.1 vs ~1.0 on held-out images (the refit was fitted on training images).
    assert err_svd * 5 < err_rnd, (err_svd, err_rnd)
    teacher_acc = evaluate(trained, digits.val)[0]
    assert evaluate(svd, digits.val)[0] > teacher_acc - 10
    assert evaluate(rnd, digits.val)[0] < 30
    # The least-squares refit only lowers each layer's output error below the plain SVD's.
    plain, _ = swap_model(trained, SwapConfig(min_channels=2))
    assert err_svd < rel_err(plain.eval()(x_val), ref)
    assert all(layer.out_error < 0.5 for layer in rep.layers)


def test_mid_bn_act_starts_as_identity(trained, digits):
    calib = digits.train.tensors[0][:128]
    x = digits.val.tensors[0][:64]
    plain, _ = swap_model(trained, SwapConfig(min_channels=2), calib)
    mid, rep = swap_model(trained, SwapConfig(min_channels=2, mid="bn-act"), calib)
    assert isinstance(mid[2].bn, nn.BatchNorm2d) and isinstance(mid[2].act, nn.ReLU)
    assert rel_err(mid.eval()(x), plain.eval()(x)) < 0.05
    assert any("calibrated" in n for n in rep.notes)


def test_pd_model_conv_params_and_macs_fall_5x():
    model = create_model("pd_model", num_classes=6, input_size=(60, 120)).eval()
    swapped, report = swap_model(model, SwapConfig())
    x = torch.zeros(1, 1, 60, 120)

    def conv_params(m):
        return sum(p.numel() for mod in m.modules() if isinstance(mod, nn.Conv2d)
                   for p in mod.parameters())

    assert conv_params(model) / conv_params(swapped) >= 5.0
    # .features holds every conv (ReLU and pooling cost no MACs), so these are conv MACs.
    assert count_macs(model.features, x) / count_macs(swapped.features, x) >= 5.0
    assert swapped(x).shape == (1, 6)
    # The 1-channel stem stays a standard conv (min_channels=4): three layers are swapped.
    assert [layer.name for layer in report.layers] == ["features.3", "features.6", "features.9"]
    assert report.layers[0].params_after == 32 * 9 + 32 * 64 + 64


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.silu(self.fc(x)) * torch.sigmoid(x)


def test_hard_activation_swap_and_functional_calls():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.SiLU(), nn.Tanh(), nn.GELU(),
                          nn.ReLU(), Gate())
    hard, rep = swap_model(model, SwapConfig(conv="none", act="hard"))
    types = [type(m) for m in hard][:6]
    assert types == [nn.Linear, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.GELU, nn.ReLU]
    assert hard[4].approximate == "tanh"
    assert [layer.name for layer in rep.layers] == ["1", "2", "3", "4"]
    assert len(rep.functional) == 2
    assert any("F.silu" in f for f in rep.functional)
    assert any("torch.sigmoid" in f for f in rep.functional)
    hs, _ = swap_model(model, SwapConfig(conv="none", act="hard", gelu="hardswish"))
    assert isinstance(hs[4], nn.Hardswish)
    r6, rep6 = swap_model(model, SwapConfig(conv="none", act="relu6"))
    assert isinstance(r6[5], nn.ReLU6) and isinstance(r6[1], nn.Sigmoid)
    assert [layer.name for layer in rep6.layers] == ["5"]
    # The original is untouched.
    assert isinstance(model[1], nn.Sigmoid)


def test_skip_keeps_named_layers(trained):
    swapped, rep = swap_model(trained, SwapConfig(min_channels=2, skip=("2",)))
    assert type(swapped[2]) is nn.Conv2d
    assert [layer.name for layer in rep.layers] == ["5"]
    with pytest.raises(TorchslimError, match="no such module"):
        swap_model(trained, SwapConfig(skip=("nope",)))


def test_no_convolution_to_swap_is_an_error():
    with pytest.raises(TorchslimError, match="no convolution to swap"):
        swap_model(nn.Sequential(nn.Linear(3, 3)), SwapConfig())
    with pytest.raises(UsageError):
        SwapConfig(conv="none")  # nothing to do at all
    with pytest.raises(UsageError):
        SwapConfig(mid="bn")


def test_low_rank_params_and_error():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(128, 3))
    low, rep = lowrank_model(model, LowRankConfig(rank_ratio=0.25))
    # rank 32: 32 * (256 + 128) + 128 bias = 12,416 instead of 256 * 128 + 128 = 32,896.
    assert sum(p.numel() for p in low[0].parameters()) == 12_416
    assert rep.layers[0].params_before == 32_896 and rep.layers[0].params_after == 12_416
    s = torch.linalg.svdvals(lin.weight.detach())
    expected = (s[32:].square().sum() / s.square().sum()).sqrt().item()
    assert rep.layers[0].rel_error == pytest.approx(expected, rel=1e-4)
    # Linear(128, 3) at rank 1 (131 < 384 weights) is replaced too; a 4x3 layer at ratio
    # 0.9 (rank 3: 21 >= 12 weights) would grow, so it is kept with a note.
    assert [layer.name for layer in rep.layers] == ["0", "2"]
    _, rep2 = lowrank_model(nn.Sequential(nn.Linear(4, 3)), LowRankConfig(rank_ratio=0.9))
    assert rep2.layers == [] and "would not reduce" in rep2.notes[0]


def test_low_rank_exact_on_low_rank_weight():
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 8) @ torch.randn(8, 64))
    new, err = factorise_linear(lin, 8)
    x = torch.randn(5, 64)
    torch.testing.assert_close(new(x), lin(x), atol=1e-3, rtol=1e-3)
    assert err < 1e-5


def _save(model, path, shape=(1, 8, 8)):
    save_model(model, path, ModelMeta(input_shape=shape, class_names=[str(i) for i in range(10)]))


def test_cli_swap_writes_reloadable_model_with_history(trained, tmp_path):
    src, out = tmp_path / "cnn.pt", tmp_path / "sep.pt"
    _save(trained, src)
    res = runner.invoke(app, ["swap", str(src), "-o", str(out), "--min-channels", "2",
                              "--data", "digits", "--calib-images", "64", "--epochs", "1",
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert [layer["name"] for layer in doc["layers"]] == ["2", "5"]
    assert doc["swapped"]["params"] < doc["before"]["params"]
    assert doc["swapped"]["accuracy"] > 80 and doc["distilled"]["accuracy"] > 80
    loaded = load_model(out)  # no --trust: only torch.nn classes
    assert [h["method"] for h in loaded.meta.history] == ["swap", "distill"]
    assert any("weight err" in n for n in loaded.meta.history[0]["notes"])
    errors = [layer["out_error"] for layer in loaded.meta.history[0]["layers"]]
    assert len(errors) == 2 and all(0 < e < 0.5 for e in errors)
    assert isinstance(loaded.model[2].depthwise, nn.Conv2d)


def test_cli_swap_errors_write_nothing(tmp_path):
    src, out = tmp_path / "mlp.pt", tmp_path / "o.pt"
    _save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), src)
    res = runner.invoke(app, ["swap", str(src), "-o", str(out)])
    assert res.exit_code == 1
    assert "no convolution to swap" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["swap", str(src), "-o", str(out), "--epochs", "2"])
    assert res.exit_code == 2 and "--data" in res.output
    assert not out.exists()
