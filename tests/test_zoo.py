"""Third-party architectures, every command, from the user's own project folder (issue 10).

tests/zoo holds architectures written the way users and other libraries write them
(ResNet, VGG-BN, DenseNet, SqueezeNet, ConvNeXt, MobileNetV2/V3, EfficientNet, RegNet,
ShuffleNetV2, the issue's FaultNet, an LSTM text classifier, a Transformer encoder, a
two-input model and a timm-style ViT with a class token). A session fixture lays them out
as top-level modules in a temporary "user project", writes the data there and saves every
model as a full pickle by running the user's own script in a separate process. Each test
then runs torchslim's CLI in this process from that folder, with --trust and the model's
real inputs, and checks numbers: params and MACs against a hand count, outputs that reload
(.pt with --trust, .onnx with onnxruntime alone) and match their source, int8 top-1
agreement with fp32, and one-line refusals where a command cannot apply.

Adding an architecture: its module in tests/zoo and one line in zoo.FAMILIES.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from zoo import FAMILIES, project
from zoo.count import Count
from zoo.run import FAST, held_out, invoke, run_onnx, run_torch, spec

from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import load_model

# Validation top-1 (%) that `report --data` must find on torchslim's split of the held-out
# file (120 samples, 0.83 points each), for models the "user" trained for a few epochs.
# Measured values (1 thread, torch 2.13 CPU) in FAMILIES' order; the floors leave 5-10
# points for other torch builds.
TOP1_FLOOR = {  # measured: 97.5, 95.8, 97.5, 91.7, 84.2, 82.5, 96.7, 94.2, 97.5, 96.7, 93.3,
    "mynet": 90, "resnet": 88, "vgg": 90, "densenet": 82, "squeezenet": 75,  # 100, 95.8, 95.0,
    # and 96.7 (ViT)
    "convnext": 72, "mobilenetv2": 88, "mobilenetv3": 85, "efficientnet": 88, "regnet": 88,
    "shufflenet": 85, "lstm_text": 95, "txencoder": 88, "twoinput": 87, "vit": 88,
}
# Static int8 (ONNX Runtime, calibrated on the held-out file) against the fp32 pickle: top-1
# agreement on all 600 held-out samples. Measured 97.0-100 % over the families (ConvNeXt
# lowest); dynamic int8 99.3-100 %.
AGREE = 0.93
ATOL = 1e-4  # fp32 ONNX against the eager .pt of the same command
# Each ONNX export costs 1-4 s of CPU even for these tiny nets, so the suite exports what
# differs by family (prune -o .onnx and static int8 for every family) and the rest once:
# swap -o .onnx on FaultNet, dynamic int8 where ONNX Runtime quantizes most of the
# weights (Linear/LSTM/attention; on the CNNs it would quantize only the classifier).
# examples/zoo_matrix.py runs every command on every family.
SWAP_ONNX = ("mynet",)
DYNAMIC = ("mynet", "lstm_text", "txencoder", "twoinput")


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory) -> Path:
    """The user's project: modules, data, and the models their own script saved."""
    return project.make(tmp_path_factory.mktemp("userproject"))


@pytest.fixture()
def user(zoo_root, monkeypatch):
    """Run from the project folder, as the user does; torchslim's sys.path additions undone.
    One thread: on these tiny models a second one only waits (and, on a busy machine, spins)."""
    monkeypatch.chdir(zoo_root)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for var in ("TORCHSLIM_TRUST", "TORCHSLIM_CODE_PATH"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield zoo_root
    torch.set_num_threads(threads)


def _out(root: Path, name: str) -> Path:
    out = root / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _model_args(name: str) -> list[str]:
    return [f"{name}.pt", "--trust", *project.inputs(name)]


def _data(name: str) -> list[str]:
    return ["--data", f"{project.family(name).DATA}.npz"]


def _example(name: str) -> tuple[torch.Tensor, ...]:
    """Three generated samples of the family's inputs (token ids inside its vocabulary)."""
    return spec(name).with_vocab(project.family(name).build()).example(3, seed=1)


def _ok(res) -> None:
    assert res.code == 0, res.stderr[-2000:]


def _said(res) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(res.stderr.split())


def _standard_convs(name: str) -> bool:
    """Whether the default swap has anything to do: a KxK, ungrouped conv with >= 4 inputs."""
    return any(isinstance(m, nn.Conv2d) and m.groups == 1 and max(m.kernel_size) > 1
               and m.in_channels >= 4 for m in project.family(name).build().modules())


# --- report: exact params and MACs ----------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_report_params_and_macs_equal_the_hand_count(user, name):
    res = invoke(["report", *_model_args(name), *_data(name), "-f", "json", *FAST])
    _ok(res)
    (row,) = json.loads(res.stdout)
    assert (row["params"], row["macs"]) == project.hand_count(name)
    assert row["accuracy"] >= TOP1_FLOOR[name]


# --- prune ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_prune_pt_and_onnx_reload_and_agree(user, name):
    out, xs = _out(user, name), _example(name)
    base = ["prune", *_model_args(name), "--ratio", "0.3", "-f", "json"]
    res = invoke([*base, "-o", out / "p.pt"])
    _ok(res)
    before, after = json.loads(res.stdout)
    assert (before["params"], before["macs"]) == project.hand_count(name)
    pruned = load_model(out / "p.pt", trust=True).model
    assert after["params"] == sum(p.numel() for p in pruned.parameters())
    if name == "lstm_text":  # recurrent layers are kept whole by design; nothing else can go
        assert (after["params"], after["macs"]) == (before["params"], before["macs"])
        assert "skipped lstm (LSTM): its units cannot be pruned" in _said(res)
        assert "nothing was pruned" in _said(res)
    else:
        assert 0.3 < after["params"] / before["params"] < 0.9
        assert 0.3 < after["macs"] / before["macs"] < 0.9
    if name == "shufflenet":  # torch-pruning mis-traces groups behind the shuffle: skipped
        assert "torch-pruning cannot trace its channel dependencies" in _said(res)
    if name == "mynet":  # the FaultNet, counted by hand after pruning too
        assert (after["params"], after["macs"]) == _faultnet_pruned_by_hand()
    ref = run_torch(out / "p.pt", xs)
    _ok(invoke([*base, "-o", out / "p.onnx"]))
    torch.testing.assert_close(run_onnx(out / "p.onnx", xs), ref, atol=ATOL, rtol=1e-3)


def _faultnet_pruned_by_hand() -> tuple[int, int]:
    """torch-pruning keeps floor(0.7 * C) channels of each conv at --ratio 0.3: FaultNet's
    8/16/32/32 become 5/11/22/22, and the classifier's inputs follow the last conv."""
    c = Count()
    for cin, cout, hw in ((1, 5, 16), (5, 11, 16), (11, 22, 8), (22, 22, 4)):
        c.conv(cin, cout, 3, hw)
        c.norm(cout)
    c.linear(22 * 2 * 2, 10)
    return c.params, c.macs


# --- swap ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_swap_pt_and_onnx_or_a_clear_refusal(user, name):
    out, xs = _out(user, name), _example(name)
    base = ["swap", *_model_args(name), "-f", "json"]
    res = invoke([*base, "-o", out / "s.pt"])
    if not _standard_convs(name):  # already separable (or no convs): nothing to swap
        assert res.code == 1 and res.outcome == "refused"
        assert res.message.startswith("no convolution to swap")
        convs = any(isinstance(m, nn.Conv2d) for m in project.family(name).build().modules())
        assert ("has no Conv2d" in res.message) != convs
        assert not (out / "s.pt").exists()
        return
    _ok(res)
    report = json.loads(res.stdout)
    assert report["swapped"]["params"] < report["before"]["params"]
    assert report["swapped"]["macs"] < report["before"]["macs"]
    ref = run_torch(out / "s.pt", xs)
    assert ref.shape == (3, 10)
    if name in SWAP_ONNX:
        _ok(invoke([*base, "-o", out / "s.onnx"]))
        torch.testing.assert_close(run_onnx(out / "s.onnx", xs), ref, atol=ATOL, rtol=1e-3)


# --- quantize ------------------------------------------------------------------------------


def _agreement(root: Path, name: str, path: Path) -> float:
    xs, _ = held_out(root, name)
    fp32 = run_torch(root / f"{name}.pt", xs)
    return (run_onnx(path, xs).argmax(1) == fp32.argmax(1)).float().mean().item()


@pytest.mark.parametrize("name,mode", [(n, "static") for n in FAMILIES] +
                         [(n, "dynamic") for n in DYNAMIC])
def test_quantize_int8_agrees_with_fp32(user, name, mode):
    path = _out(user, name) / f"q-{mode}.onnx"
    res = invoke(["quantize", *_model_args(name), "--mode", mode, *_data(name),
                  "--no-compare", "-o", path])
    _ok(res)
    assert f"wrote {path} ({mode}, runs on onnxruntime)" in res.stdout
    assert _agreement(user, name, path) >= AGREE


# --- compress ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_compress_prune_then_fp16_to_pt(user, name):
    """The pipeline on every family: measured rows per step, a .pt that reloads with
    --trust (it holds the user's classes) and runs. (Its int8 route is quantize's test.)"""
    path = _out(user, name) / "c.pt"
    res = invoke(["compress", *_model_args(name), *_data(name), "--prune", "0.3",
                  "--quantize", "fp16", *FAST, "-o", path])
    _ok(res)
    rows = json.loads(path.with_suffix(".report.json").read_text())
    assert [r["step"] for r in rows] == ["input", "prune", "quantize"]
    start, pruned, half = rows
    assert (start["params"], start["macs"]) == project.hand_count(name)
    if name == "lstm_text":
        assert pruned["params"] == start["params"]  # recurrent layers kept whole
    else:
        assert pruned["params"] < start["params"] and pruned["macs"] < start["macs"]
    if name == "mynet":  # the same prune as the prune command's
        assert (pruned["params"], pruned["macs"]) == _faultnet_pruned_by_hand()
    assert half["params"] == pruned["params"]
    if pruned["params"] >= 4096:  # 2 bytes saved a weight; below ~4k weights (DenseNet's 804
        assert half["file_bytes"] < pruned["file_bytes"]  # after pruning) metadata dominates
    with pytest.raises(TorchslimError, match="--trust"):
        load_model(path)
    xs, _ = held_out(user, name, 8)
    assert run_torch(path, xs).shape == (8, 4 if name == "lstm_text" else 10)


# --- the FaultNet story, and finding the user's code -----------------------------


def test_faultnet_story_every_output_reloads_and_report_compares(user):
    """Issue 10, "done when": from the project folder with only --trust, the issue's own
    compress command writes small.onnx (int8) and small.fp32.pt beside it; the .pt needs
    --trust and names the class, the .onnx does not; `report` measures both against the
    input. (compress -o c.pt itself: test_compress_prune_then_fp16_to_pt.)"""
    onnx = _out(user, "story") / "small.onnx"
    pt = onnx.with_suffix(".fp32.pt")
    _ok(invoke(["compress", *_model_args("mynet"), *_data("mynet"), "--swap", "--act", "hard",
                "--prune", "0.4", "--distill", "--epochs", "5", "--quantize", "static", *FAST,
                "-o", onnx]))
    refused = invoke(["report", pt, "--input-shape", "1,16,16", *FAST])
    assert refused.outcome == "refused" and refused.code == 1
    assert "mynet.FaultNet" in refused.message and "--trust" in refused.message
    res = invoke(["report", "mynet.pt", onnx, pt, "--trust", "--input-shape", "1,16,16",
                  *_data("mynet"), "-f", "json", *FAST])
    _ok(res)
    original, int8, fp32 = json.loads(res.stdout)
    assert int8["file_bytes"] < fp32["file_bytes"] < original["file_bytes"]
    assert fp32["params"] < original["params"] and fp32["macs"] < original["macs"]
    assert int8["macs"] == fp32["macs"]  # int8 does the same multiply-adds
    # swap + --act hard + 40 % of the channels leave 1.76k of 16.5k params, recovered by 5
    # epochs of distillation on 480 images: measured 79.2 % (fp32) / 78.3 % (int8) against
    # 97.5 % (chance: 10 %; it is 7.5 % right after pruning)
    assert fp32["accuracy"] >= 65.0 and int8["accuracy"] >= 65.0
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 3.0


def test_onnx_and_pt2_outputs_load_without_the_users_code(user, tmp_path):
    """A fresh process, run elsewhere, with neither the project folder nor torchslim's
    loader: the .onnx runs with onnxruntime alone, the .pt2 with torch.export.load."""
    out = _out(user, "mynet")
    base = ["prune", *_model_args("mynet"), "--ratio", "0.3", "-o"]
    _ok(invoke([*base, out / "fresh.pt2"]))
    onnx = out / "p.onnx"  # the same (deterministic) prune, when the prune test wrote it
    if not onnx.exists():
        _ok(invoke([*base, onnx]))
    x = torch.randn(2, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, numpy as np, onnxruntime as ort, torch\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}')\n"
        "assert 'mynet' not in sys.modules\n"
        f"sess = ort.InferenceSession(r'{onnx}')\n"
        "a = sess.run(None, {'input': x.numpy()})[0]\n"
        f"b = torch.export.load(r'{out / 'fresh.pt2'}').module()(x).detach().numpy()\n"
        "assert 'mynet' not in sys.modules, 'the .pt2 imported the user module'\n"
        "np.save('out.npy', np.stack([a, b]))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    onnx_out, pt2_out = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert onnx_out.shape == (2, 10)
    torch.testing.assert_close(onnx_out, pt2_out, atol=ATOL, rtol=1e-3)


def test_a_users_pickle_needs_trust_and_names_its_classes(user):
    res = invoke(["report", "resnet.pt", "--input-shape", "1,16,16"])
    assert res.code == 1 and res.outcome == "refused"
    assert "resnet.ResNet" in res.message and "--trust" in res.message
    with pytest.raises(TorchslimError, match="--trust"):
        load_model(user / "resnet.pt")


def test_a_class_from_a_scripts_main_gets_its_own_explanation(user):
    res = invoke(["report", "scriptnet.pt", "--trust", "--input-shape", "1,16,16"])
    assert res.code == 1 and res.outcome == "refused"
    assert res.message.startswith("scriptnet.pt cannot load ScriptNet: it was defined in the "
                                  "script that saved the model (__main__)")
    assert "move the class into a module" in res.message and "--arch" in res.message


def test_a_module_elsewhere_is_named_then_found_with_code_path(user):
    args = ["report", "lost.pt", "--trust", "--input", "1,8", "-f", "json", *FAST]
    res = invoke(args)
    assert res.code == 1 and res.outcome == "refused"
    assert "lostnet.LostNet" in res.message and "--code-path" in res.message
    res = invoke([*args, "--code-path", "lib"])
    _ok(res)
    (row,) = json.loads(res.stdout)
    assert (row["params"], row["macs"]) == (8 * 4 + 4, 8 * 4)
