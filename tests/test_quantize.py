"""Quantization: real int8 files that are smaller, stay accurate, reload, and fail clearly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress import onnx_quant as oq
from torchslim.compress.config import config_from_dict, config_to_dict
from torchslim.compress.errors import TorchslimError, UsageError
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.quantize import QuantizeConfig, compare, quantize_model
from torchslim.compress.train import TrainConfig, fit
from torchslim.models.registry import create_model

runner = CliRunner()


class ResCNN(nn.Module):
    """Conv-BN stem, one residual block, a Linear head holding most weights (~136 k params,
    ~0.3 M MACs: cheap to train, yet big enough that file overhead does not hide the 4x)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 128), nn.ReLU(),
                                  nn.Linear(128, 10))

    def forward(self, x):  # (B, 1, 8, 8)
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = ResCNN()
    fit(model, digits, TrainConfig(epochs=2, augment=False))
    return model.eval()


@pytest.fixture(scope="module")
def static_int8(trained, digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("static")
    res = quantize_model(trained, QuantizeConfig(mode="static", calib_batches=4), data=digits,
                         out_path=d / "m.onnx", keep_fp32_onnx=d / "fp32.onnx")
    return res


def test_static_int8_is_small_accurate_and_int8(trained, digits, static_int8):
    res = static_int8
    fp32_bytes = res.fp32_onnx.stat().st_size
    assert res.path.stat().st_size <= 0.27 * fp32_bytes
    assert res.accuracy_before > 90.0  # a real baseline, so the bound below means something
    assert abs(res.accuracy_after - res.accuracy_before) <= 1.0  # stated bound: 1 point
    # BN folded, every conv/linear runs int8 but the output layer, kept in fp32 on purpose
    assert res.int8_ops.get("QLinearConv", 0) == 2 and res.int8_ops.get("QGemm", 0) == 1
    assert res.fallbacks == []
    assert any(n.startswith("output layer node_linear_1 kept in fp32") for n in res.notes)


def test_output_layer_is_found_through_reshapes_and_can_be_int8(trained, digits, tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
                        nn.Softmax(dim=1))
    path = oq.export_onnx(net, (1, 8, 8), tmp_path / "n.onnx")
    gemms = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and oq.output_layers(path) == [gemms[1]]  # through the Softmax
    res = quantize_model(trained, QuantizeConfig(mode="static", calib_batches=2,
                                                 keep_output_fp32=False),
                         data=digits, out_path=tmp_path / "all.onnx")
    assert res.int8_ops.get("QGemm", 0) == 2  # --int8-output: every layer int8
    assert not any(n.startswith("output layer") for n in res.notes)


def test_static_metadata_history_and_report_sizes(static_int8):
    meta = oq.read_metadata(static_int8.path)
    step = meta["history"][-1]
    assert step["method"] == "quantize" and step["config"]["mode"] == "static"
    assert step["config"]["calib_batches"] == 4
    assert any("calibrated on 128 training samples" in n for n in step["notes"])
    assert step["before"]["accuracy"] == pytest.approx(static_int8.accuracy_before)
    assert step["after"]["accuracy"] == pytest.approx(static_int8.accuracy_after)
    assert step["after"]["file_bytes"] == static_int8.path.stat().st_size
    loaded = load_model(static_int8.path)
    assert loaded.kind == "onnx" and loaded.meta.input_shape == (1, 8, 8)
    props = {p.key: p.value for p in onnx.load(str(static_int8.path)).metadata_props}
    assert int(props["torchslim.macs"]) == step["before"]["macs"] > 0


def test_static_reloads_in_fresh_process_with_same_accuracy(static_int8):
    code = (
        "from torchslim.compress.data import load_data\n"
        "from torchslim.compress.io import load_model\n"
        "from torchslim.compress.onnx_quant import OnnxRunner\n"
        "from torchslim.compress.train import evaluate\n"
        f"m = load_model({str(static_int8.path)!r})\n"
        "print(m.kind, evaluate(OnnxRunner(m.path), load_data('digits', seed=0).val)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out[0] == "onnx"
    assert float(out[1]) == pytest.approx(static_int8.accuracy_after, abs=1e-9)


def test_compare_rows_same_runtime_and_fastest(trained, digits, static_int8):
    rows = compare(trained, static_int8, data=digits, threads=1, batch_size=8,
                   min_run_time=0.02)
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime", "onnxruntime"]
    fastest = min(r["latency_ms_median"] for r in rows[:2])
    q = rows[2]
    assert q["speedup_vs_fastest_fp32"] == pytest.approx(fastest / q["latency_ms_median"])
    assert q["speedup_vs_fp32_same_runtime"] == pytest.approx(
        rows[1]["latency_ms_median"] / q["latency_ms_median"])
    assert q["file_bytes"] == static_int8.path.stat().st_size
    assert q["accuracy"] == pytest.approx(static_int8.accuracy_after)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_dynamic_sequence_models_small_and_close(arch, digits, tmp_path):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    res = quantize_model(model, QuantizeConfig(mode="dynamic"), input_shape=(1, 8, 8),
                         out_path=tmp_path / "q.onnx", keep_fp32_onnx=tmp_path / "f.onnx")
    assert res.path.stat().st_size <= 0.35 * res.fp32_onnx.stat().st_size
    x = digits.val.tensors[0][:64]
    with torch.no_grad():
        ref = model(x)
    out = oq.OnnxRunner(res.path)(x)
    # stated tolerance: int8 weights and per-call activations keep outputs within 5 % of
    # the logits' range
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    key = "DynamicQuantizeLSTM" if arch == "lstm" else "DynamicQuantizeMatMul"
    assert res.int8_ops.get(key, 0) >= 1


def test_lstm_exports_with_a_dynamic_batch_axis(tmp_path):
    """Traced at batch 1, torch.export specialised the LSTM's batch axis and the exporter
    silently wrote a graph fixed at batch 1; exported at batch 2 the axis stays dynamic."""
    torch.manual_seed(0)
    model = create_model("lstm", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    path = oq.export_onnx(model, (1, 8, 8), tmp_path / "f.onnx")
    assert oq.fixed_batch(path) is None
    x = torch.randn(5, 1, 8, 8)
    out = oq.session(path).run(None, {oq.INPUT: x.numpy()})[0]  # one call at batch 5
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,atol,max_ratio", [("fp16", 2e-3, 0.55), ("bf16", 3e-2, 0.55)])
def test_half_precision_outputs_close(mode, atol, max_ratio, digits, tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet_small", num_classes=10, in_channels=1, input_size=(8, 8))
    fp32_path = save_model(model.eval(), tmp_path / "fp32.pt", ModelMeta(input_shape=(1, 8, 8)))
    res = quantize_model(load_model(fp32_path), QuantizeConfig(mode=mode),
                         out_path=tmp_path / f"{mode}.pt")
    assert res.path.stat().st_size <= max_ratio * fp32_path.stat().st_size
    reloaded = load_model(res.path).model  # no --trust: the wrapper is on the allow-list
    x = digits.val.tensors[0][:32]
    with torch.no_grad():
        ref, out = model(x), reloaded(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=atol * ref.abs().max().item(), rtol=0)


def test_weight_only_int8_pt(digits, tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    fp32_path = save_model(model, tmp_path / "fp32.pt", ModelMeta(input_shape=(1, 8, 8)))
    res = quantize_model(load_model(fp32_path), QuantizeConfig(mode="weight-only"),
                         out_path=tmp_path / "w8.pt")
    assert res.path.stat().st_size <= 0.30 * fp32_path.stat().st_size
    reloaded = load_model(res.path).model
    state = reloaded.state_dict()
    qweights = [v for k, v in state.items() if k.endswith("qweight")]
    assert len(qweights) == 3 and all(q.dtype == torch.int8 for q in qweights)
    x = digits.val.tensors[0][:64]
    with torch.no_grad():
        ref, out = model(x), reloaded(x)
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_mobilenet_style_net_quantizes_with_fallbacks_listed(digits, tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenet_tiny", num_classes=10, in_channels=1, input_size=(8, 8))
    exported = onnx.load(str(oq.export_onnx(model, (1, 8, 8), tmp_path / "f.onnx")))
    convs = [n.name for n in exported.graph.node if n.op_type == "Conv"]
    res = quantize_model(model, QuantizeConfig(mode="static", calib_batches=2,
                                               exclude=(convs[0],)),
                         data=digits, out_path=tmp_path / "q.onnx")
    # depthwise, pointwise and SE convs run int8; the excluded one is listed as fp32
    assert res.int8_ops["QLinearConv"] == len(convs) - 1
    assert [f.split(" ")[0] for f in res.fallbacks] == [convs[0]]
    assert any("HardSigmoid" in n for n in res.notes)  # SE gate stays fp32 and is named
    assert abs(res.accuracy_after - res.accuracy_before) <= 5.0  # untrained: near chance


def test_qat_finetunes_then_exports_int8(trained, digits, tmp_path):
    x, y = digits.train.tensors
    small = dataclasses.replace(digits, train=TensorDataset(x[:320], y[:320]))  # test speed
    res = quantize_model(trained, QuantizeConfig(mode="qat", qat_epochs=1, calib_batches=2),
                         data=small, out_path=tmp_path / "qat.onnx")
    assert res.int8_ops.get("QLinearConv", 0) == 2 and res.fallbacks == []
    assert res.int8_ops.get("QGemm", 0) == 1  # the output layer stays fp32
    assert res.accuracy_after >= res.accuracy_before - 1.0
    assert any(n.startswith("qat: 1 epochs") for n in res.notes)


def test_config_validation_and_roundtrip():
    with pytest.raises(TorchslimError, match="unknown quantize mode 'int3'"):
        QuantizeConfig(mode="int3")
    with pytest.raises(UsageError, match="not available for mode static"):
        QuantizeConfig(mode="static", backend="torch")
    cfg = QuantizeConfig(mode="dynamic", exclude=("a",))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.suffix == ".onnx" and QuantizeConfig(mode="fp16").suffix == ".pt"


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet_tiny", num_classes=10, in_channels=1, input_size=(8, 8))
    return save_model(model.eval(), tmp_path_factory.mktemp("cli") / "tiny.pt",
                      ModelMeta(input_shape=(1, 8, 8)))


def test_cli_static_then_report(tiny_pt, tmp_path):
    out = tmp_path / "q.onnx"
    r = runner.invoke(app, ["quantize", str(tiny_pt), "--mode", "static", "--data", "digits",
                            "--calib-batches", "2", "--no-compare", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists() and "QLinearConv x" in r.output and "fp32 fallback: none" in r.output
    r = runner.invoke(app, ["report", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)[0]
    assert rec["file_bytes"] == out.stat().st_size and rec["runtime"] == "onnxruntime"
    assert rec["macs"] > 0 and rec["history"][-1]["method"] == "quantize"


def test_cli_errors_exit_1_and_write_nothing(tiny_pt, tmp_path):
    out = tmp_path / "q.onnx"
    r = runner.invoke(app, ["quantize", str(tiny_pt), "--mode", "int3", "-o", str(out)])
    assert r.exit_code == 1 and "unknown quantize mode 'int3'" in r.output
    r = runner.invoke(app, ["quantize", str(tiny_pt), "--mode", "static", "-o", str(out)])
    assert r.exit_code == 1 and "needs --data" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:  # Python branch on a tensor value: torch.export cannot trace it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def test_cli_export_failure_one_line(tmp_path):
    path = tmp_path / "dd.pt"
    torch.save(DataDependent(), path)
    out = tmp_path / "q.onnx"
    r = runner.invoke(app, ["quantize", str(path), "--trust", "--mode", "dynamic",
                            "--input-shape", "1,8,8", "-o", str(out)])
    assert r.exit_code == 1
    assert "cannot export the model to ONNX" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_reduce_range_follows_the_cpu(monkeypatch):
    from torchslim.compress import hw

    monkeypatch.setattr(hw, "int8_saturates", lambda: True)
    assert QuantizeConfig().use_reduce_range
    assert not QuantizeConfig(reduce_range="off").use_reduce_range
    monkeypatch.setattr(hw, "int8_saturates", lambda: False)
    assert not QuantizeConfig().use_reduce_range
    assert QuantizeConfig(reduce_range="on").use_reduce_range
    with pytest.raises(UsageError, match="--reduce-range"):
        QuantizeConfig(reduce_range="maybe")


def test_qat_trains_against_the_7_bit_grid_that_ships():
    from torchslim.compress.runtime import WeightFakeQuant

    w = torch.randn(4, 16)
    for qmax in (127, 64):  # ONNX Runtime's reduce_range int8 weights span [-64, 64]
        q = WeightFakeQuant(qmax)(w)
        steps = q / (w.abs().amax(1, keepdim=True) / qmax)
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert steps.abs().max().round() == qmax
