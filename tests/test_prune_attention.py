"""Structured pruning of attention models written outside torchslim (tests/zoo/vit.py):
heads and embedding width kept consistent, class token / position table pruned with them,
shapes hard-coded in a forward kept whole, and a clear refusal where nothing can be named."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner
from zoo.vit import (
    Attention,
    FixedShapeAttention,
    LegacyAttention,
    SeparateQKVAttention,
    SeqTransformer,
    TorchViT,
    ViT,
)

from torchslim.cli.app import app
from torchslim.compress.errors import TorchslimError
from torchslim.compress.prune import PruneConfig, count_macs, prune_model
from torchslim.compress.prune_attention import PruneShapeError, check_forward
from torchslim.compress.sensitivity import scan
from torchslim.compress.train import TrainConfig, evaluate, fit

X8 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
TOKENS = 17  # 4 x 4 patches of 2 x 2 pixels, plus the class token


def vit_params(dim: int, hidden: int, inner: int | None = None, depth: int = 2) -> int:
    """Parameters of tests/zoo ViT(img 8, patch 2, 1 channel, 10 classes) at these widths:
    embedding ``dim``, MLP ``hidden``, attention ``inner`` (= heads x head_dim)."""
    inner = dim if inner is None else inner
    block = (2 * dim + 3 * inner * dim + 3 * inner + inner * dim + dim  # norm1, qkv, proj
             + 2 * dim + dim * hidden + hidden + hidden * dim + dim)  # norm2, fc1, fc2
    stem = dim * 4 + dim + dim + TOKENS * dim  # patch conv, class token, position table
    return stem + depth * block + 2 * dim + dim * 10 + 10


def vit_macs(dim: int, hidden: int, inner: int | None = None, depth: int = 2) -> int:
    inner = dim if inner is None else inner
    block = (TOKENS * dim * 3 * inner  # qkv
             + 2 * TOKENS * TOKENS * inner  # q k^T and attn v over all heads
             + TOKENS * inner * dim + 2 * TOKENS * dim * hidden)  # proj, fc1, fc2
    return 16 * dim * 4 + depth * block + dim * 10


def shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def runs_like(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert pruned.eval()(x).shape == model.eval()(x).shape
    pruned.train()(x).sum().backward()  # trainable: fine-tuning works on it


@pytest.mark.parametrize("make", [
    lambda: ViT(),  # timm Attention, F.scaled_dot_product_attention
    lambda: ViT(fused=False),  # timm Attention, explicit softmax(q k^T) v
    lambda: ViT(attn_cls=LegacyAttention),  # C // num_heads
    lambda: ViT(attn_cls=SeparateQKVAttention),  # Hugging Face names, q/k/v Linears
    lambda: TorchViT(),  # nn.TransformerEncoderLayer
], ids=["timm", "timm-softmax", "timm-legacy", "hf-qkv", "torch-mha"])
def test_vit_styles_prune_heads_embedding_and_tokens_together(make):
    torch.manual_seed(0)
    model = make().eval()
    assert count_macs(model, X8) == vit_macs(32, 64)  # the hand count matches the meter
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3), X8)
    runs_like(model, pruned, torch.randn(3, 1, 8, 8))
    # 4 heads x 8 dims lose 3 dims each (int(8 * 0.7) = 5 kept): embedding 32 -> 20, and
    # the embedding in the same per-head units; MLP 64 -> 44 (int(64 * 0.7))
    assert rep.before["params"] == vit_params(32, 64) == 18218
    assert rep.after["params"] == vit_params(20, 44) == 7878
    assert (rep.before["macs"], rep.after["macs"]) == (vit_macs(32, 64), vit_macs(20, 44))
    s = shapes(pruned)
    assert s["cls_token"] == (1, 1, 20) and s["pos_embed"] == (1, TOKENS, 20)
    assert rep.notes == []


def test_head_attributes_follow_the_pruned_widths():
    torch.manual_seed(0)
    pruned, _ = prune_model(ViT().eval(), PruneConfig(ratio=0.3), X8)
    assert [(b.attn.num_heads, b.attn.head_dim) for b in pruned.blocks] == [(4, 5)] * 2
    hf, _ = prune_model(ViT(attn_cls=SeparateQKVAttention).eval(), PruneConfig(ratio=0.3), X8)
    a = hf.blocks[0].attn
    assert (a.num_attention_heads, a.attention_head_size, a.all_head_size) == (4, 5, 20)
    assert a.query.out_features == a.key.out_features == a.value.out_features == 20
    mha, _ = prune_model(TorchViT().eval(), PruneConfig(ratio=0.3), X8)
    attn = mha.encoder.layers[0].self_attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (4, 5, 20)


class FlatAttention(Attention):
    """timm's Attention as torch-pruning's ViT example rewrites it: heads flattened with
    reshape(B, N, -1), so its width may differ from the embedding's; fixed softmax scale."""

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


def test_pruned_heads_compute_the_same_function_when_the_removed_dims_were_zero():
    """Zero the dims pruning will remove: the pruned model must compute the same outputs,
    so q, k, v and proj were sliced consistently, head by head."""
    torch.manual_seed(0)
    model = ViT(attn_cls=FlatAttention).eval()
    with torch.no_grad():
        for b in model.blocks:  # last 3 of every head's 8 dims (q, k and v) and fc1 units
            for part in range(3 * 4):
                rows = slice(part * 8 + 5, part * 8 + 8)
                b.attn.qkv.weight[rows] = 0
                b.attn.qkv.bias[rows] = 0
            b.mlp.fc1.weight[44:] = 0
            b.mlp.fc1.bias[44:] = 0
    # the embedding kept 32 wide (LayerNorm statistics would change without those channels)
    cfg = PruneConfig(ratio=0.3, ignore=("patch_embed.proj",))
    pruned, rep = prune_model(model, cfg, X8)
    assert rep.after["params"] == vit_params(32, 44, inner=20) and rep.notes == []
    assert [(b.attn.num_heads, b.attn.head_dim) for b in pruned.blocks] == [(4, 5)] * 2
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)


def test_global_ranking_keeps_heads_times_head_dim_equal_to_the_embedding():
    torch.manual_seed(0)
    model = ViT().eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3, global_pruning=True), X8)
    runs_like(model, pruned, torch.randn(2, 1, 8, 8))
    for b in pruned.blocks:
        dim = b.norm1.normalized_shape[0]
        assert b.attn.qkv.out_features == 3 * dim == 3 * b.attn.num_heads * b.attn.head_dim
    assert rep.after["params"] < 0.5 * rep.before["params"]


def test_text_sequence_transformer_keeps_the_input_width_and_prunes_the_ffn():
    torch.manual_seed(0)
    model = SeqTransformer().eval()  # (batch, 16, 32) floats, encoder width = input width
    x = torch.randn(1, 16, 32)
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3), x)
    runs_like(model, pruned, torch.randn(4, 16, 32))
    widths = [(m.linear1.out_features, m.self_attn.embed_dim) for m in pruned.encoder.layers]
    assert widths == [(44, 32)] * 2  # FFN 64 -> 44; attention = the input's 32 features
    drop_per_layer = 20 * 32 + 20 + 32 * 20  # linear1 rows + bias, linear2 columns
    assert rep.before["params"] - rep.after["params"] == 2 * drop_per_layer
    assert rep.before["macs"] - rep.after["macs"] == 2 * 16 * 2 * 32 * 20
    assert rep.notes == ["kept encoder.layers.0.linear2, encoder.layers.1.linear2 whole: "
                         "coupled to the model's input, whose width is fixed"]


class InputResidualNet(nn.Module):
    """x + f(x) on the image itself: f's last conv must keep the input's 3 channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 3, 3, padding=1)
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        x = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_channels_added_to_the_input_are_not_pruned():
    model = InputResidualNet().eval()
    x = torch.randn(1, 3, 8, 8)
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5), x)
    runs_like(model, pruned, torch.randn(2, 3, 8, 8))
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (8, 3)
    assert rep.before["params"] - rep.after["params"] == 8 * (3 * 9 + 1) + 3 * 8 * 9
    assert rep.notes == ["kept conv2 whole: coupled to the model's input, whose width is fixed"]


# --- shapes written as literals -----------------------------------------------------------


def test_hard_coded_attention_keeps_its_qkv_and_prunes_the_rest():
    torch.manual_seed(0)
    model = ViT(attn_cls=FixedShapeAttention).eval()  # x.view(B, N, 3, 4, 8) in forward
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3), X8)
    runs_like(model, pruned, torch.randn(3, 1, 8, 8))
    assert [b.attn.qkv.weight.shape for b in pruned.blocks] == [(96, 22)] * 2
    # embedding 32 -> 22 (no head grouping: the module states no head count); MLP 64 -> 44
    assert rep.after["params"] == vit_params(22, 44, inner=32) == 10828
    assert rep.after["macs"] == vit_macs(22, 44, inner=32)
    (note,) = rep.notes
    assert re.fullmatch(
        r"kept blocks.0.attn.qkv, blocks.1.attn.qkv whole: the forward of FixedShapeAttention "
        r"fails when their widths change \(RuntimeError: shape '\[1, 17, 3, 4, 8\]' is "
        r"invalid for input of size \d+\)", note), note


def test_a_pruned_forward_that_fails_names_the_module_and_the_layer_to_ignore():
    model = ViT(attn_cls=FixedShapeAttention).eval()
    model.blocks[1].attn.qkv = nn.Linear(32, 60)  # what pruning its heads would leave
    with pytest.raises(PruneShapeError) as err:
        check_forward(model, X8, (1, 10))
    assert str(err.value) == (
        "pruning breaks 'blocks.1.attn' (FixedShapeAttention): RuntimeError: shape "
        "'[1, 17, 3, 4, 8]' is invalid for input of size 1020; its forward fixes a width "
        "that pruning changed; keep that width: --ignore blocks.1.attn.qkv"
    )


class GridPosViT(ViT):
    """Reshapes its position table to the patch grid with literal sizes."""

    def forward(self, x):
        grid = self.pos_embed[:, 1:].reshape(1, 4, 4, 32)  # (1, H, W, dim)
        pos = torch.cat([self.pos_embed[:, :1], grid.flatten(1, 2)], dim=1)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_a_parameter_reshaped_with_literals_keeps_its_channel_group():
    torch.manual_seed(0)
    model = GridPosViT().eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3), X8)
    runs_like(model, pruned, torch.randn(2, 1, 8, 8))
    assert shapes(pruned)["pos_embed"] == (1, TOKENS, 32)  # the embedding stays 32 wide
    # ... so the timm attention, which reshapes to (B, N, C), keeps its heads too
    assert rep.after["params"] == vit_params(32, 44)
    assert rep.notes[0] == (
        "kept patch_embed.proj whole, and with it the width of pos_embed: the forward of "
        "GridPosViT fails when that changes (RuntimeError: shape '[1, 4, 4, 32]' is invalid "
        "for input of size 320)")
    assert rep.notes[1].startswith("kept blocks.0.attn.qkv, blocks.1.attn.qkv whole")


class WidthCheckedViT(ViT):
    """Validates its own parameters before running any layer."""

    def forward(self, x):
        if self.pos_embed.shape[-1] != 32:
            raise ValueError("this checkpoint expects 32 features")
        return super().forward(x)


def test_a_failure_no_layer_explains_is_refused_before_any_work():
    with pytest.raises(TorchslimError) as err:
        prune_model(WidthCheckedViT().eval(), PruneConfig(ratio=0.3), X8)
    assert str(err.value) == (
        "cannot prune this model: the model's forward (WidthCheckedViT) fails after pruning "
        "(ValueError: this checkpoint expects 32 features) and torchslim cannot tell which "
        "layer's width it fixes; --ignore the layers that feed it, or prune with "
        "--unstructured"
    )
    # the way out it names works: the embedding group kept, the MLPs pruned
    cfg = PruneConfig(ratio=0.3, ignore=("patch_embed.proj",))
    pruned, rep = prune_model(WidthCheckedViT().eval(), cfg, X8)
    assert rep.after["params"] == vit_params(32, 44)


def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path):
    src = tmp_path / "vit.pt"
    torch.save(WidthCheckedViT().eval(), src)  # a user's full pickle
    out = tmp_path / "p.pt"
    res = CliRunner().invoke(app, ["prune", str(src), "--trust", "--ratio", "0.3",
                                   "--input-shape", "1,8,8", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "cannot prune this model: the model's forward (WidthCheckedViT)" in res.stderr
    assert "--ignore the layers that feed it" in res.stderr
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert not out.exists()


# --- real data: pruned, then fine-tuned ----------------------------------------------------


@pytest.fixture(scope="module")
def trained_vit(digits):
    torch.manual_seed(0)
    model = ViT()  # 8x8 digits as 16 patches of 2x2
    fit(model, digits, TrainConfig(epochs=8, lr=5e-3, augment=False))
    return model.eval()


def test_vit_recovers_its_accuracy_after_pruning_and_fine_tuning(trained_vit, digits):
    base = evaluate(trained_vit, digits.val)[0]
    assert base > 80.0
    tcfg = TrainConfig(epochs=3, lr=5e-3, augment=False)
    pruned, rep = prune_model(trained_vit, PruneConfig(ratio=0.3), X8, data=digits,
                              train_cfg=tcfg)
    assert rep.after["params"] == vit_params(20, 44)
    assert rep.pruned_top1 < base - 20  # 57 % of the weights gone: it needs the fine-tune
    assert rep.after["accuracy"] == pytest.approx(evaluate(pruned, digits.val)[0])
    assert rep.after["accuracy"] >= base - 5.0


def test_sensitivity_scan_runs_on_a_vit(trained_vit, digits):
    res = scan(trained_vit, digits, X8, [0.5])
    assert set(res.layers) >= {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    for layer in res.layers:  # a number, or None where the layer cannot be pruned alone
        (acc,) = res.accuracy[layer]
        assert acc is None or 0.0 <= acc <= 100.0
