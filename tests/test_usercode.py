"""Users' own model files: classes from their project, inputs that are not one image.

The user project is a temp folder holding ``usernet.py``; the models are pickled by a
separate Python process run there, exactly as a user's training script would save them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress import onnx_quant as oq
from torchslim.compress.errors import UsageError
from torchslim.compress.inputs import InputSpec, parse_tensor
from torchslim.compress.io import load_model

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.01"]

USERNET = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class ConvBN(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))


    class FaultNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1, self.b2 = ConvBN(1, 8), ConvBN(8, 16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = F.max_pool2d(self.b1(x), 2)
            return self.fc(F.adaptive_avg_pool2d(self.b2(x), 1).flatten(1))


    class TokenLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 8)
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.hidden = nn.Linear(16, 16)
            self.fc = nn.Linear(16, 3)

        def forward(self, tokens):
            out, _ = self.lstm(self.emb(tokens))
            return self.fc(F.relu(self.hidden(out[:, -1])))


    class TwoInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.meta = nn.Linear(3, 4)
            self.fc = nn.Linear(8, 2)

        def forward(self, image, extra):
            a = F.adaptive_avg_pool2d(F.relu(self.conv(image)), 1).flatten(1)
            return self.fc(torch.cat([a, F.relu(self.meta(extra))], 1))
''')

SAVE = textwrap.dedent('''
    import numpy as np, torch
    from usernet import FaultNet, TokenLSTM, TwoInput
    torch.manual_seed(0)
    torch.save(FaultNet().eval(), "model.pt")
    torch.save(TokenLSTM().eval(), "lstm.pt")
    torch.save(TwoInput().eval(), "two.pt")
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    tokens = (y[:, None] * 33 + g.integers(0, 33, (120, 12))).astype(np.int64)
    np.savez("tokens.npz", x=tokens, y=y)
    y2 = np.repeat(np.arange(2), 40)
    np.savez("two.npz", x0=g.random((80, 1, 8, 8)).astype(np.float32),
             x1=(g.random((80, 3)) + y2[:, None]).astype(np.float32), y=y2)
''')

# Hand counts. FaultNet at 1x16x16: conv 1->8 (72) + BN (16) + conv 8->16 (1152) + BN (32)
# + fc 16->10 (170); MACs: 8*9*16*16 + 16*8*9*8*8 + 160 (BatchNorm is not a MAC).
FAULTNET = {"params": 72 + 16 + 1152 + 32 + 170, "macs": 18432 + 73728 + 160}
# TokenLSTM on 12 tokens: embedding 100x8, LSTM 4*16*(8+16) + 2*4*16 biases, hidden
# 16->16, fc 16->3; MACs: 12 steps x 4*16*(8+16), plus the two Linears (an embedding
# lookup multiplies nothing).
LSTM = {"params": 800 + 1536 + 128 + 272 + 51, "macs": 12 * 1536 + 256 + 48}
# TwoInput: conv 1->4 3x3 (+bias), Linear 3->4, Linear 8->2; MACs at 8x8.
TWO = {"params": 40 + 16 + 18, "macs": 4 * 9 * 64 + 12 + 16}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("userproject")
    (root / "usernet.py").write_text(USERNET)
    subprocess.run([sys.executable, "-c", SAVE], cwd=root, check=True, timeout=120)
    return root


def _console() -> str:
    return str(Path(sys.executable).parent / "torchslim")


def _run(args, cwd):
    return subprocess.run([_console(), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_console_script_finds_the_users_code_where_python_would(project, tmp_path):
    """The issue's first failure: `report model.pt --trust` from the project directory."""
    ok = _run(["report", "model.pt", "--trust", "--input-shape", "1,16,16", "-f", "json",
               *FAST], project)
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(ok.stdout)[0]
    assert (rec["params"], rec["macs"]) == (FAULTNET["params"], FAULTNET["macs"])
    elsewhere = _run(["report", project / "model.pt", "--trust", "--input-shape", "1,16,16",
                      *FAST], tmp_path)
    assert elsewhere.returncode == 0  # the model file's own folder is searched too
    moved = tmp_path / "moved.pt"
    moved.write_bytes((project / "model.pt").read_bytes())
    lost = _run(["report", moved, "--trust", "--input-shape", "1,16,16"], tmp_path)
    assert lost.returncode == 1 and "Traceback" not in lost.stderr
    assert "needs usernet.ConvBN, usernet.FaultNet" in lost.stderr
    assert "module 'usernet' is not importable" in lost.stderr and "--code-path" in lost.stderr
    found = _run(["report", moved, "--trust", "--code-path", project, "--input-shape",
                  "1,16,16", *FAST], tmp_path)
    assert found.returncode == 0, found.stderr
    untrusted = _run(["report", "model.pt"], project)
    assert untrusted.returncode == 1 and "usernet.FaultNet" in untrusted.stderr
    assert "--trust" in untrusted.stderr


def test_class_from_a_scripts_main_gets_its_own_explanation(tmp_path):
    script = "import torch\nfrom torch import nn\n" \
             "class Net(nn.Linear):\n    pass\n" \
             "torch.save(Net(4, 2), 'main.pt')\n"
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=60)
    res = runner.invoke(app, ["report", str(tmp_path / "main.pt"), "--trust"])
    assert res.exit_code == 1
    assert "defined in the script that saved the model (__main__)" in res.stderr
    assert "--arch mynet:ClassName" in res.stderr


@pytest.fixture()
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)
    return project


def test_prune_writes_the_users_classes_and_a_self_contained_onnx(in_project):
    args = ["prune", "model.pt", "--trust", "--input-shape", "1,16,16", "--ratio", "0.5"]
    res = runner.invoke(app, [*args, "-o", "p.pt", "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "-o", "p.onnx", "--force"])
    assert res.exit_code == 0, res.output
    with pytest.raises(Exception, match="usernet.FaultNet"):
        load_model(in_project / "p.pt")
    pruned = load_model(in_project / "p.pt", trust=True)
    assert pruned.meta.requires == ["usernet.ConvBN", "usernet.FaultNet"]
    # half the channels of each conv: 1->4, 4->8, fc 8->10
    assert sum(p.numel() for p in pruned.model.parameters()) == 36 + 8 + 288 + 16 + 90
    onnx_file = load_model(in_project / "p.onnx")  # no --trust: no pickle, no user code
    assert onnx_file.kind == "onnx" and onnx_file.meta.input_shape == (1, 16, 16)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(oq.OnnxRunner(in_project / "p.onnx")(x),
                                   pruned.model(x), atol=1e-4, rtol=1e-4)


def test_pt2_output_loads_with_trust_measures_and_refuses_pruning(in_project):
    res = runner.invoke(app, ["swap", "model.pt", "--trust", "--input-shape", "1,16,16",
                              "--min-channels", "2", "-o", "s.pt2", "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", "s.pt2"])
    assert res.exit_code == 1 and "torch.export program" in res.stderr
    res = runner.invoke(app, ["report", "s.pt2", "--trust", "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    # b2 (8 -> 16, 3x3) became depthwise (72) + pointwise (128): 1152 -> 200 weights
    assert rec["params"] == FAULTNET["params"] - 1152 + 72 + 128
    res = runner.invoke(app, ["prune", "s.pt2", "--trust", "--ratio", "0.3", "-o", "x.pt"])
    assert res.exit_code == 1 and "cannot transform a torch.export (.pt2) file" in res.stderr


def test_outputs_are_checked_before_any_work(in_project):
    res = runner.invoke(app, ["prune", "model.pt", "--trust", "--ratio", "0.3", "-o", "p.txt"])
    assert res.exit_code == 2 and ".onnx (self-contained" in res.stderr
    (in_project / "exists.pt").write_bytes(b"x")
    # the output is refused before the (missing) model is even opened
    res = runner.invoke(app, ["prune", "missing.pt", "--ratio", "0.3", "-o", "exists.pt"])
    assert res.exit_code == 1 and "exists; pass --force" in res.stderr
    res = runner.invoke(app, ["compress", "model.pt", "--trust", "--prune", "0.3",
                              "--quantize", "dynamic", "-o", "c.pt"])
    assert res.exit_code == 2 and "writes a .onnx file" in res.stderr


def test_token_ids_report_quantize_and_prune(in_project):
    res = runner.invoke(app, ["report", "lstm.pt", "--trust", "--input", "1,12:int64",
                              "--data", "tokens.npz", "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    assert (rec["params"], rec["macs"]) == (LSTM["params"], LSTM["macs"])
    assert rec["inputs"] == ["1,12:int64:100"]  # generated ids stay inside the embedding
    assert rec["accuracy"] is not None
    res = runner.invoke(app, ["quantize", "lstm.pt", "--trust", "--input", "1,12:int64",
                              "--mode", "dynamic", "-o", "q.onnx", "--force", "--no-compare"])
    assert res.exit_code == 0, res.output
    tokens = torch.randint(0, 100, (5, 12))
    out = oq.OnnxRunner(in_project / "q.onnx")(tokens)
    ref = load_model(in_project / "lstm.pt", trust=True).model(tokens)
    assert out.shape == (5, 3) and (out - ref).abs().max() <= 0.1 * ref.abs().max() + 1e-3
    res = runner.invoke(app, ["report", "q.onnx", "-f", "json", *FAST])
    assert res.exit_code == 0, res.output  # the int8 LSTM's weights count as parameters
    assert json.loads(res.stdout)[0]["params"] == LSTM["params"]
    res = runner.invoke(app, ["prune", "lstm.pt", "--trust", "--input", "1,12:int64",
                              "--ratio", "0.5", "-o", "lp.pt", "--force", "-f", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert "skipped lstm (LSTM)" in res.stderr  # recurrent units are kept whole by design
    # half of the hidden Linear's 16 units go: hidden 16->8 (136), fc 8->3 (27)
    assert rows[1]["params"] == LSTM["params"] - 272 - 51 + 136 + 27


def test_two_inputs_through_report_quantize_and_compress(in_project):
    two = ["--input", "1,1,8,8", "--input", "1,3"]
    res = runner.invoke(app, ["report", "two.pt", "--trust", *two, "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    assert (rec["params"], rec["macs"]) == (TWO["params"], TWO["macs"])
    res = runner.invoke(app, ["quantize", "two.pt", "--trust", "--data", "two.npz",
                              "--mode", "static", "-o", "two.onnx", "--force", "--no-compare"])
    assert res.exit_code == 0, res.output
    assert oq.graph_inputs(in_project / "two.onnx") == ["image", "extra"]
    res = runner.invoke(app, ["compress", "two.pt", "--trust", "--data", "two.npz",
                              "--prune", "0.5", "--distill", "--epochs", "2", "-o", "c2.onnx",
                              "--force", *FAST])
    assert res.exit_code == 0, res.output
    steps = json.loads((in_project / "c2.report.json").read_text())
    assert steps[-1]["params"] < steps[0]["params"] and steps[-1]["accuracy"] >= 50.0


def test_input_spec_syntax():
    assert parse_tensor("1,20:int64").shape == (1, 20)
    assert parse_tensor("1x3x8x8").dtype == "float32"
    assert parse_tensor("2,5:long:30").high == 30
    spec = InputSpec.parse(["1,20:int64"])
    assert spec.example(3)[0].dtype == torch.int64 and spec.example(3)[0].max() <= 1
    emb = torch.nn.Embedding(50, 4)
    assert int(spec.with_vocab(emb).example(64)[0].max()) < 50
    for bad in ("1,x", "1,2:complex", "0,3", "1,2:int64:0", ""):
        with pytest.raises(UsageError):
            parse_tensor(bad)
    with pytest.raises(UsageError, match="same batch size"):
        InputSpec.parse(["1,4", "2,4"])
    res = runner.invoke(app, ["report", "m.pt", "--input", "1,2:complex"])
    assert res.exit_code == 2 and "--input '1,2:complex'" in res.stderr
    res = runner.invoke(app, ["report", "m.pt", "--input", "1,2", "--input-shape", "1,8,8"])
    assert res.exit_code == 2 and "not both" in res.stderr


def test_train_sizes_images_to_the_model_and_distill_takes_aliases(tmp_path):
    res = runner.invoke(app, ["train", "pd", "--data", "digits", "--epochs", "0",
                              "-o", str(tmp_path / "pd.pt")])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "pd.pt").meta.input_shape == (1, 60, 120)
    res = runner.invoke(app, ["train", "pd", "--data", "digits", "--image-size", "16,32",
                              "--epochs", "1", "-o", str(tmp_path / "pd16.pt")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "pd16.pt"), "--student",
                              "pdlight", "--epochs", "1", "-o", str(tmp_path / "light.pt"),
                              "--threads", "1"])
    assert res.exit_code == 0, res.output
    light = load_model(tmp_path / "light.pt")
    assert light.meta.arch["name"] == "pd_light" and light.meta.input_shape == (1, 16, 32)


def test_sequence_data_stays_rank3_for_a_sequence_model(tmp_path):
    x = np.random.default_rng(0).random((30, 16, 32)).astype(np.float32)
    np.savez(tmp_path / "seq.npz", x=x, y=np.repeat(np.arange(3), 10))
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 32, 3)).eval()
    torch.save(model, tmp_path / "enc.pt")
    res = runner.invoke(app, ["report", str(tmp_path / "enc.pt"), "--trust", "--input",
                              "1,16,32", "--data", str(tmp_path / "seq.npz"), "-f", "json",
                              *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["input_shape"] == [16, 32]
