"""Structured and unstructured pruning, sensitivity, and the prune/sensitivity commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress import sensitivity as sens
from torchslim.compress.config import config_from_dict, config_to_dict
from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.prune import PruneConfig, count_macs, prune_model
from torchslim.compress.train import TrainConfig, evaluate, fit
from torchslim.models.registry import create_model

runner = CliRunner()
X8 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def out_widths(m: nn.Module, kind=(nn.Conv2d, nn.Linear)) -> list[int]:
    return [layer.weight.shape[0] for layer in m.modules() if isinstance(layer, kind)]


def check_same_io(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert pruned.eval()(x).shape == model.eval()(x).shape


# --- structured pruning on each architecture family -------------------------------------


def conv_chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def test_plain_conv_chain_halves_channels_and_quarters_inner_convs():
    model = conv_chain()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5), X8)
    check_same_io(model, pruned, X8)
    assert out_widths(pruned) == [4, 8, 8, 10]  # classifier outputs kept
    # exact counts: conv(1->4), conv(4->8), conv(8->8) with 3x3 kernels + biases, fc 8->10
    expected = (4 * 9 + 4) + (8 * 4 * 9 + 8) + (8 * 8 * 9 + 8) + (8 * 10 + 10)
    assert n_params(pruned) == rep.after["params"] == expected
    inner_before = 16 * 16 * 9
    assert pruned[4].weight.numel() * 4 == inner_before  # inner conv: exactly 4x fewer
    # MACs: each conv layer's output and input halve (stem input fixed) -> < 0.3x overall
    assert rep.after["macs"] <= 0.3 * rep.before["macs"]
    assert rep.before["macs"] == count_macs(model, X8)


def test_pruning_exactly_the_dead_channels_keeps_outputs_identical():
    torch.manual_seed(0)
    model = create_model("pd_tiny", input_size=(16, 16)).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    with torch.no_grad():
        for layer in layers:  # kill the first quarter of every layer's outputs
            k = layer.weight.shape[0] // 4
            layer.weight[:k] = 0
            layer.bias[:k] = 0
    x = torch.randn(4, 1, 16, 16)
    pruned, _ = prune_model(model, PruneConfig(ratio=0.25, importance="l1"), x[:1])
    assert out_widths(pruned) == [3 * w // 4 for w in out_widths(model)[:-1]] + [10]
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-6)


def test_residual_cnn_shrinks_coupled_channels_together():
    model = create_model("resnet_tiny").eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5), X8)
    check_same_io(model, pruned, X8)
    for m in pruned.modules():
        if isinstance(m, nn.BatchNorm2d):  # every BN still matches its conv
            assert m.num_features in (4, 8)
    assert rep.after["params"] <= 0.3 * rep.before["params"]
    assert rep.after["macs"] <= 0.3 * rep.before["macs"]


def test_depthwise_mobilenet_keeps_groups_equal_to_channels():
    model = create_model("mobilenet_tiny").eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5, round_to=2), X8)
    check_same_io(model, pruned, X8)
    depthwise = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert all(w % 2 == 0 for w in out_widths(pruned, nn.Conv2d))
    assert rep.after["params"] <= 0.35 * rep.before["params"]
    assert rep.after["macs"] <= 0.35 * rep.before["macs"]


@pytest.mark.parametrize(("n_pruned", "channels", "round_to", "expected"), [
    (4, 16, 16, 0),  # one SIMD block: left whole (torch-pruning's own rounding removed all 16)
    (8, 32, 16, 0),  # keep 24 -> nearest multiple is 32 (half rounds up)
    (20, 32, 16, 16),  # keep 12 -> 16
    (31, 32, 16, 16),  # never below one multiple
    (48, 128, 16, 48),  # keep 80 = 5 x 16: already a multiple
    (5, 12, 16, 0),  # narrower than the block: left alone
    (3, 10, 4, 2),  # keep 7 -> 8
])
def test_rounded_prune_count(n_pruned, channels, round_to, expected):
    from torchslim.compress.prune import rounded_prune_count

    assert rounded_prune_count(n_pruned, channels, round_to) == expected


def test_round_to_a_layer_width_keeps_that_layer_and_rounds_the_rest():
    model = create_model("resnet_small", num_classes=10, in_channels=1, input_size=(8, 8))
    pruned, rep = prune_model(model.eval(), PruneConfig(ratio=0.5, round_to=16), X8)
    check_same_io(model, pruned, X8)
    widths = out_widths(pruned, nn.Conv2d)
    assert widths[0] == 16  # the 16-channel stem group is one block: kept whole
    assert all(w % 16 == 0 for w in widths)
    assert sorted(set(widths)) == [16, 32, 64]  # 32 -> 16, 64 -> 32, 128 -> 64
    from torchslim.models.resnet import ResNet

    same_shape = ResNet(10, 1, (16, 16, 32, 64), (1, 1, 1, 1))  # what the pruned net must be
    assert rep.after["params"] == n_params(same_shape)
    assert rep.after["macs"] == count_macs(same_shape, X8)


def test_transformer_prunes_whole_head_widths_and_runs_in_train_mode():
    model = create_model("transformer_tiny").eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5), X8)
    check_same_io(model, pruned, X8)
    attn = [m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attn and all(m.embed_dim == 8 and m.embed_dim % m.num_heads == 0 for m in attn)
    pruned.train()(torch.randn(3, 1, 8, 8)).sum().backward()  # the slow path works too
    assert rep.after["params"] <= 0.35 * rep.before["params"]
    assert rep.after["macs"] < 0.35 * rep.before["macs"]


class LSTMWithLinears(nn.Module):
    """Rows -> Linear -> LSTM -> Linear -> ReLU -> Linear: the Linear parts are prunable."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.lstm = nn.LSTM(32, 24, batch_first=True)
        self.hidden = nn.Linear(24, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        seq, _ = self.lstm(torch.relu(self.inp(x.flatten(1, 2))))  # (B, 8 rows, 24)
        return self.head(torch.relu(self.hidden(seq[:, -1])))


def test_lstm_keeps_its_units_and_prunes_the_linear_parts():
    model = LSTMWithLinears().eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5), X8)
    check_same_io(model, pruned, X8)
    assert pruned.lstm.hidden_size == 24 and pruned.lstm.input_size == 16
    assert (pruned.inp.out_features, pruned.hidden.out_features) == (16, 16)
    assert any("lstm" in n and "cannot be pruned" in n for n in rep.notes)
    lstm_before = 4 * 24 * (32 + 24 + 2)
    lstm_after = 4 * 24 * (16 + 24 + 2)
    drop = (8 * 16 + 16) + (lstm_before - lstm_after) + (24 * 16 + 16) + 16 * 10
    assert rep.before["params"] - rep.after["params"] == drop


def test_registry_lstm_reports_nothing_prunable():
    model = create_model("lstm_tiny").eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.5), X8)
    assert rep.after["params"] == rep.before["params"]
    assert any("nothing was pruned" in n for n in rep.notes)


def test_channel_shuffle_skips_the_groups_torch_pruning_mis_traces():
    """ShuffleNetV2's view/transpose shuffle: torch-pruning builds some groups whose indices
    run past a layer's channels (pruning crashed with IndexError in its importance step).
    Those layers are skipped with a note; every other group is pruned and the net runs."""
    from zoo.shufflenet import ShuffleNetV2

    torch.manual_seed(0)
    model = ShuffleNetV2().eval()
    x = torch.randn(2, 1, 16, 16)
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3), x[:1])
    check_same_io(model, pruned, x)
    skipped = sorted(n.split()[1].rstrip(":") for n in rep.notes if "cannot trace" in n)
    assert skipped == ["stage2.1.branch2.5", "stage3.0.branch1.0", "stage3.1.branch2.5"]
    assert 0.5 < rep.after["params"] / rep.before["params"] < 0.9
    assert rep.after["macs"] < 0.8 * rep.before["macs"]
    for m in pruned.modules():  # depthwise convs still have one group per channel
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


def test_hand_written_channel_layernorm_shrinks_with_its_channels():
    """ConvNeXt's own channels-first LayerNorm is a custom leaf holding two vectors. It
    was skipped while its channels were pruned anyway, and the pruned net failed (size 16
    vs 11); now its vectors are pruned with the conv that feeds them."""
    from zoo.convnext import ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt().eval()
    x = torch.randn(2, 1, 16, 16)
    pruned, rep = prune_model(model, PruneConfig(ratio=0.3), x[:1])
    check_same_io(model, pruned, x)
    stem, norm = pruned.downsample_layers[0]
    assert stem.out_channels == 11 == 16 - int(0.3 * 16 + 0.5)  # floor(0.7 * 16) kept
    assert norm.weight.shape == norm.bias.shape == pruned.stages[0][0].gamma.shape == (11,)
    assert not any("LayerNorm" in n for n in rep.notes)
    assert rep.after["macs"] < 0.6 * rep.before["macs"]


def test_the_plan_does_not_depend_on_the_model_pruned_before():
    """torch-pruning's pruners are shared objects whose pruning_dim is set per call. Read
    directly after ConvNeXt's vectors (dim 0), the transformer's (1, 16, 32) positional
    embedding looked 1 wide and three of its layers were skipped as untraceable."""
    from zoo.convnext import ConvNeXt
    from zoo.txencoder import SeqTransformer

    x = torch.randn(1, 16, 32)
    torch.manual_seed(0)
    first, _ = prune_model(SeqTransformer().eval(), PruneConfig(ratio=0.3), x)
    prune_model(ConvNeXt().eval(), PruneConfig(ratio=0.3), torch.randn(1, 1, 16, 16))
    torch.manual_seed(0)
    again, rep = prune_model(SeqTransformer().eval(), PruneConfig(ratio=0.3), x)
    assert not [n for n in rep.notes if "cannot trace" in n]
    assert [p.shape for p in again.parameters()] == [p.shape for p in first.parameters()]
    assert again.pos.shape == (1, 16, 4 * 5)  # each of 4 heads keeps floor(0.7 * 8) dims


def test_mlp_exact_neuron_counts_and_iterative_steps_agree():
    model = create_model("mlp_tiny").eval()
    one, _ = prune_model(model, PruneConfig(ratio=0.5), X8)
    two, rep = prune_model(model, PruneConfig(ratio=0.5, steps=2), X8)
    assert out_widths(one) == out_widths(two) == [16, 16, 10]
    assert rep.after["params"] == (64 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10)
    assert n_params(model) == rep.before["params"]  # the input model is left untouched


def test_target_macs_lands_at_or_below_the_target():
    model = create_model("resnet_small", input_size=(8, 8)).eval()
    pruned, rep = prune_model(model, PruneConfig(target_macs=0.5), X8)
    frac = rep.after["macs"] / rep.before["macs"]
    assert 0.4 <= frac <= 0.505, frac
    assert 0.2 < rep.ratio < 0.35  # MACs ~ (1 - ratio)^2 for conv-to-conv layers


def test_global_ranking_prunes_unevenly_but_to_the_same_total():
    model = create_model("resnet_small", input_size=(16, 16)).eval()
    x = torch.randn(1, 1, 16, 16)
    local, _ = prune_model(model, PruneConfig(ratio=0.3), x)
    glob, _ = prune_model(model, PruneConfig(ratio=0.3, global_pruning=True), x)
    total = sum(out_widths(model, nn.Conv2d))
    assert abs(sum(out_widths(glob, nn.Conv2d)) - sum(out_widths(local, nn.Conv2d))) <= 0.05 * total
    assert out_widths(glob, nn.Conv2d) != out_widths(local, nn.Conv2d)


def test_unstructured_zeroes_the_asked_fraction_and_is_honest():
    model = create_model("mlp_tiny").eval()
    pruned, rep = prune_model(model, PruneConfig(ratio=0.6, unstructured=True,
                                                 global_pruning=True), X8)
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)][:-1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * sum(w.numel() for w in weights))
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())
    assert rep.after["params"] == rep.before["params"] and rep.after["macs"] == rep.before["macs"]
    assert rep.after["nonzero_params"] == rep.before["nonzero_params"] - zeros
    assert rep.after["compressed_bytes"] < 0.8 * rep.before["compressed_bytes"]
    assert any("do not shrink" in n for n in rep.notes)


def test_ignored_layers_keep_their_width_and_random_is_seeded():
    model = create_model("mlp_tiny").eval()
    pruned, _ = prune_model(model, PruneConfig(ratio=0.5, ignore=("net.1",)), X8)
    assert out_widths(pruned) == [32, 16, 10]
    cfg = PruneConfig(ratio=0.5, importance="random", seed=3)
    a, _ = prune_model(model, cfg, X8)
    b, _ = prune_model(model, cfg, X8)
    assert torch.equal(a.net[1].weight, b.net[1].weight)  # same seed, same channels kept


def test_config_round_trips_through_a_recipe_dict():
    cfg = PruneConfig(layer_ratios={"net.1": 0.5}, ignore=("net.3",), round_to=4)
    d = config_to_dict(cfg)
    assert d["method"] == "prune" and json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg


@pytest.mark.parametrize("cfg, message", [
    (dict(ratio=1.0), "--ratio must be in"),
    (dict(ratio=-0.1), "--ratio must be in"),
    (dict(target_macs=1.5), "--target-macs must be in"),
    (dict(ratio=0.5, importance="magic"), "choose one of"),
    (dict(ratio=0.5, target_macs=0.5), "exactly one of"),
    (dict(target_macs=0.5, unstructured=True), "saves no MACs"),
])
def test_config_errors(cfg, message):
    with pytest.raises(TorchslimError, match=message):
        PruneConfig(**cfg)


def test_library_errors_whole_layer_and_unknown_names():
    model = create_model("resnet_tiny").eval()
    with pytest.raises(TorchslimError, match=r"would remove all \d+ channels of layer"):
        prune_model(model, PruneConfig(ratio=0.95), X8)
    with pytest.raises(TorchslimError, match="no layer named 'nope'"):
        prune_model(model, PruneConfig(ratio=0.5, ignore=("nope",)), X8)
    with pytest.raises(TorchslimError, match="taylor needs gradients"):
        prune_model(model, PruneConfig(ratio=0.5, importance="taylor"), X8)


# --- with data: fine-tuning, taylor, sensitivity ---------------------------------------


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    model = create_model("mlp_tiny")
    fit(model, digits, TrainConfig(epochs=6, lr=0.01, augment=False))
    return model.eval()


def test_finetune_recovers_accuracy_and_distill_runs(trained_mlp, digits):
    base = evaluate(trained_mlp, digits.val)[0]
    assert base > 85.0
    cfg = PruneConfig(ratio=0.75, importance="taylor")
    tcfg = TrainConfig(epochs=3, lr=0.01, augment=False)
    pruned, rep = prune_model(trained_mlp, cfg, X8, data=digits, train_cfg=tcfg, distill=True)
    assert out_widths(pruned) == [8, 8, 10]
    assert rep.before["accuracy"] == pytest.approx(base)
    assert rep.after["accuracy"] == pytest.approx(evaluate(pruned, digits.val)[0])
    assert rep.after["accuracy"] > rep.pruned_top1 + 5  # 8 hidden units, retrained, recover
    assert rep.after["accuracy"] > 70.0


def test_sensitivity_scan_json_png_and_picked_ratios(trained_mlp, digits, tmp_path):
    res = sens.scan(trained_mlp, digits, X8, [0.25, 0.5, 0.75])
    assert set(res.layers) == {"net.1", "net.3"}  # the two hidden Linears; head kept
    assert res.channels == {"net.1": 32, "net.3": 32}
    assert res.baseline == pytest.approx(evaluate(trained_mlp, digits.val)[0])
    ratios = {"net.1": 0.5}
    pruned, _ = prune_model(trained_mlp, PruneConfig(layer_ratios=ratios), X8)
    idx = res.ratios.index(0.5)
    assert evaluate(pruned, digits.val)[0] == pytest.approx(res.accuracy["net.1"][idx])
    for layer in res.layers:  # pruning more never helps much without fine-tuning
        assert res.accuracy[layer][-1] <= res.baseline + 1.0
    sens.save(res, tmp_path / "s.json")
    assert sens.load(tmp_path / "s.json") == res
    sens.plot(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pick_ratios_takes_the_largest_ratio_within_the_drop():
    res = sens.SensitivityResult(
        ratios=[0.1, 0.3, 0.5], baseline=90.0, layers=["a", "b", "c"],
        channels={"a": 8, "b": 8, "c": 8},
        accuracy={"a": [90.0, 89.6, 85.0], "b": [89.0, 88.0, 80.0], "c": [90.0, 90.0, None]},
    )
    assert sens.pick_ratios(res, 0.5) == {"a": 0.3, "c": 0.3}
    assert sens.pick_ratios(res, 5.0) == {"a": 0.5, "b": 0.3, "c": 0.3}
    hopeless = sens.SensitivityResult([0.5], 90.0, ["a"], {"a": 8}, {"a": [50.0]})
    with pytest.raises(TorchslimError, match="no layer stays within"):
        sens.pick_ratios(hopeless, 0.5)


# --- files: save, reload in a fresh process, CLI ---------------------------------------


RELOAD = """
import sys, torch
from torchslim.compress.io import load_model
torch.set_num_threads(int(sys.argv[1]))
x = torch.load(sys.argv[2])
with torch.no_grad():  # same conditions as the parent: the transformer's fast path
    ys = [load_model(path).model(x) for path in sys.argv[4:]]  # no --trust
torch.save(ys, sys.argv[3])
"""


def test_pruned_files_reload_in_a_fresh_process_with_identical_outputs(tmp_path):
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    paths, expected = [], []
    for name in ("resnet_tiny", "mobilenet_tiny", "transformer_tiny", "mlp_tiny"):
        pruned, _ = prune_model(create_model(name).eval(), PruneConfig(ratio=0.5), X8)
        paths.append(tmp_path / f"{name}.pt")
        save_model(pruned, paths[-1], ModelMeta(input_shape=(1, 8, 8)))
        with torch.no_grad():
            expected.append(pruned(x))
    subprocess.run([sys.executable, "-c", RELOAD, str(torch.get_num_threads()),
                    str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), *map(str, paths)],
                   check=True, timeout=300)
    for path, got, want in zip(paths, torch.load(tmp_path / "y.pt"), expected, strict=True):
        assert torch.equal(got, want), path.name


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prune") / "res.pt"
    save_model(create_model("resnet_tiny").eval(), path, ModelMeta(input_shape=(1, 8, 8)))
    return path


def test_cli_prune_writes_history_and_table(model_file, tmp_path):
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["prune", str(model_file), "--ratio", "0.5", "-o", str(out),
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    before, after = json.loads(res.stdout)
    loaded = load_model(out)
    assert after["params"] == n_params(loaded.model) <= 0.3 * before["params"]
    assert after["file_bytes"] == out.stat().st_size < before["file_bytes"]
    (step,) = loaded.meta.history
    assert step["method"] == "prune" and step["config"]["ratio"] == 0.5
    assert step["after"]["macs"] == after["macs"] < step["before"]["macs"]


def test_cli_sensitivity_then_prune_from_it(model_file, tmp_path):
    sj = tmp_path / "s.json"
    res = runner.invoke(app, ["sensitivity", str(model_file), "--data", "digits",
                              "--ratios", "0.25,0.5", "-o", str(sj)])
    assert res.exit_code == 0, res.output
    assert sj.exists() and sj.with_suffix(".png").exists()
    assert "stem.0" in res.stdout
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["prune", str(model_file), "--from-sensitivity", str(sj),
                              "--max-drop", "100", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert n_params(load_model(out).model) < n_params(load_model(model_file).model)


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.2"], "--ratio must be in 0 <= x < 1"),
    (["--ratio", "0.95"], "would remove all 16 channels"),
    (["--target-macs", "0.001"], "out of reach"),
    (["--ratio", "0.5", "--importance", "taylor"], "taylor needs gradients"),
    (["--ratio", "0.5", "--ignore", "stem.0,nope"], "no layer named 'nope'"),
])
def test_cli_errors_one_line_exit_1_nothing_written(model_file, tmp_path, args, message):
    out = tmp_path / "p.pt"
    res = runner.invoke(app, ["prune", str(model_file), *args, "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp files left behind either
