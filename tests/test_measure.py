"""Measurement: counts against sum(numel), FlopCounterMode and hand counts; latency; ONNX."""

from __future__ import annotations

import gzip
import io
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.measure import (
    MACS_METADATA_KEY,
    count_macs,
    count_params,
    environment,
    measure,
    measure_latency,
    state_dict_bytes,
)
from torchslim.models.registry import create_model

TINY = 0.02  # seconds of timing per batch size: the statistics, not the figures, are tested
JSON_KEYS = {"model", "params", "nonzero_params", "file_bytes", "macs", "latency_ms_median",
             "latency_ms_p90", "batch_size", "threads", "accuracy", "top5"}


def conv_net(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, classes),
    )


def mlp(classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


@pytest.fixture(scope="module")
def trained_mlp(digits):
    """A linear-ish classifier trained for a second on real digits (about 95 % top-1)."""
    torch.manual_seed(0)
    model = mlp()
    x, y = digits.train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------------- parameters


def test_params_equal_sum_of_numel_and_shared_weights_count_once():
    model = conv_net()
    total, nonzero = count_params(model)
    assert total == sum(p.numel() for p in model.parameters()) == 8 * 9 + 8 + 16 + 8 * 9 + 8 \
        + 8 * 16 + 16 + 16 * 10 + 10
    assert nonzero == total - 8  # BatchNorm's bias starts at zero
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == (16, 16)


def test_nonzero_after_zeroing_half_the_weights():
    model = mlp()
    with torch.no_grad():
        w = model[1].weight  # (32, 64)
        w[:16] = 0
    total, nonzero = count_params(model)
    assert total == 64 * 32 + 32 + 32 * 10 + 10
    assert nonzero == total - 16 * 64


def test_nonzero_sees_torch_prune_masks():
    model = mlp()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    total, nonzero = count_params(model)
    assert total == 64 * 32 + 32 + 32 * 10 + 10
    assert nonzero == total - 32 * 64 // 2


def test_int8_weight_buffers_count_as_the_weights_they_replace():
    from torchslim.compress.runtime import int8_weight_only

    model = mlp()
    fp32_total, _ = count_params(model)
    fp32_bytes = state_dict_bytes(model.state_dict())
    int8, _ = int8_weight_only(mlp())
    assert count_params(int8)[0] == fp32_total
    # as fp32 the int8 weights take 4 bytes each again, plus the per-channel scales
    assert fp32_bytes < state_dict_bytes(int8.state_dict()) < fp32_bytes + 4 * (32 + 10) + 1024


# ------------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("build, shape", [
    (conv_net, (1, 1, 16, 16)),
    (mlp, (1, 1, 8, 8)),
    (lambda: create_model("resnet_tiny", num_classes=10, in_channels=1), (1, 1, 16, 16)),
    (lambda: create_model("mobilenet_tiny", num_classes=10, in_channels=1), (1, 1, 16, 16)),
])
def test_macs_match_flop_counter_on_conv_and_linear_nets(build, shape):
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    ours, reference = count_macs(model, x), flop_counter_macs(model, x)
    assert reference > 0
    assert abs(ours - reference) <= 0.01 * reference


def test_conv_macs_by_hand_including_depthwise_and_grouped():
    x = torch.randn(1, 8, 10, 10)
    assert count_macs(nn.Conv2d(8, 8, 3, padding=1, groups=8), x) == 8 * 10 * 10 * 9
    assert count_macs(nn.Conv2d(8, 16, 3, padding=1, groups=4), x) == 16 * 10 * 10 * 2 * 9
    assert count_macs(nn.Conv2d(8, 16, 3), x) == 16 * 8 * 8 * 8 * 9
    assert count_macs(nn.Linear(64, 32), torch.randn(3, 64)) == 3 * 64 * 32


T, B, IN, H = 7, 3, 8, 16  # time steps, batch, input size, hidden size


def test_lstm_macs_exact_hand_count():
    per_step = 4 * (IN * H + H * H)  # four gates, input and recurrent matmuls
    lstm = nn.LSTM(IN, H, batch_first=True)
    x = torch.randn(B, T, IN)
    assert flop_counter_macs(lstm, x) == 0  # what FlopCounterMode alone misses (oneDNN)
    assert count_macs(lstm, x) == B * T * per_step
    deep = nn.LSTM(IN, H, num_layers=2, bidirectional=True)
    layer2 = 4 * (2 * H * H + H * H)  # input of layer 2 is both directions' outputs
    assert count_macs(deep, torch.randn(T, B, IN)) == B * T * 2 * (per_step + layer2)


def test_lstm_with_projection_macs_exact():
    P = 5
    lstm = nn.LSTM(IN, H, proj_size=P)
    # recurrent matmul runs on the projected state, and the projection itself costs H*P
    assert count_macs(lstm, torch.randn(T, B, IN)) == B * T * (4 * (IN * H + P * H) + H * P)


def test_gru_and_rnn_macs_exact_hand_count():
    gru = nn.GRU(IN, H, num_layers=2)
    assert count_macs(gru, torch.randn(T, B, IN)) == B * T * (3 * (IN * H + H * H) + 3 * 2 * H * H)
    assert count_macs(nn.RNN(IN, H), torch.randn(T, B, IN)) == B * T * (IN * H + H * H)


def test_scripted_lstm_model_counts_the_same():
    model = create_model("lstm_tiny", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    x = torch.randn(1, 1, 8, 8)
    eager = count_macs(model, x)
    assert eager > flop_counter_macs(model, x)
    assert count_macs(torch.jit.trace(model, x), x) == eager


def mha_hand(b: int, q_len: int, kv_len: int, e: int) -> int:
    projections = b * q_len * e * e + 2 * b * kv_len * e * e + b * q_len * e * e  # q, k, v, out
    return projections + 2 * b * q_len * kv_len * e  # Q K^T and A V over all heads


def test_multihead_attention_eval_fast_path_macs():
    E, L = 16, 5
    mha = nn.MultiheadAttention(E, 4, batch_first=True).eval()
    x = torch.randn(B, L, E)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        mha(x, x, x)
    assert counter.get_total_flops() == 0  # the fused kernel hides every matmul from it
    assert count_macs(mha, (x, x, x)) == mha_hand(B, L, L, E)
    memory = torch.randn(B, 9, E)
    assert count_macs(mha, (x, memory, memory)) == mha_hand(B, L, 9, E)


def test_transformer_encoder_macs_exact():
    E, L, FF = 16, 6, 32
    layer = nn.TransformerEncoderLayer(E, 2, FF, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    per_layer = mha_hand(B, L, L, E) + B * L * 2 * E * FF
    assert count_macs(encoder, torch.randn(B, L, E)) == 2 * per_layer


def test_sdpa_macs_exact():
    class Attention(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(2, 4, 5, 8)  # (B, heads, L, head_dim)
    assert count_macs(Attention(), q) == 2 * 4 * 5 * 5 * 8 * 2


def test_count_macs_leaves_training_flags_alone():
    model = conv_net().train()
    model[1].eval()
    count_macs(model, torch.randn(1, 1, 8, 8))
    assert model.training and not model[1].training


# ---------------------------------------------------------------------------- latency


def test_latency_stats_positive_and_threads_restored():
    torch.set_num_threads(2)
    stats = measure_latency(mlp().eval(), torch.randn(1, 1, 8, 8), threads=1, min_run_time=TINY)
    assert torch.get_num_threads() == 2
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.runs >= 1


def test_environment_records_what_latency_depends_on():
    env = environment(3)
    assert env["threads"] == 3
    assert env["torch"] == torch.__version__
    assert env["cpu"] and env["platform"]


# ---------------------------------------------------------------------------- measure()


def test_measure_record_on_real_data(trained_mlp, digits):
    torch.set_num_threads(2)
    rec = measure(trained_mlp, name="mlp", data=digits, threads=1, batch_size=8,
                  min_run_time=TINY)
    assert torch.get_num_threads() == 2 and rec.threads == rec.env["threads"] == 1
    assert rec.params == rec.nonzero_params == 64 * 32 + 32 + 32 * 10 + 10
    assert rec.macs == 64 * 32 + 32 * 10
    assert rec.input_shape == (1, 8, 8)
    assert rec.accuracy > 90 and rec.top5 >= rec.accuracy
    assert rec.file_bytes is None and rec.compressed_bytes is None
    buf = io.BytesIO()
    torch.save(trained_mlp.state_dict(), buf)
    assert rec.state_dict_bytes == len(buf.getvalue())
    assert 0 < rec.latency_ms_median <= rec.latency_ms_p90
    assert 0 < rec.batch_latency_ms_median <= rec.batch_latency_ms_p90
    d = json.loads(json.dumps(rec.to_dict()))
    assert JSON_KEYS <= set(d) and d["batch_size"] == 8 and d["threads"] == 1


def test_measure_without_data_and_five_classes_has_no_top5():
    rec = measure(mlp(classes=5), input_shape=(1, 8, 8), threads=1, min_run_time=TINY)
    assert rec.accuracy is None and rec.top5 is None and rec.macs == 64 * 32 + 32 * 5


def test_state_dict_bytes_is_fp32_size():
    model = mlp()
    fp32 = state_dict_bytes(model.state_dict())
    assert fp32 == state_dict_bytes(model.half().state_dict())
    assert fp32 > 4 * (64 * 32 + 32 * 10)


def test_sparse_file_compresses(tmp_path, digits):
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) < 0.1)  # keep ~10 % of the weights
    path = save_model(model, tmp_path / "sparse.pt", ModelMeta(input_shape=(1, 8, 8)))
    rec = measure(load_model(path), data=digits, threads=1, min_run_time=TINY)
    assert rec.model == "sparse.pt"
    assert rec.file_bytes == path.stat().st_size
    assert rec.compressed_bytes == len(gzip.compress(path.read_bytes(), compresslevel=6))
    assert rec.compressed_bytes < 0.6 * rec.file_bytes
    assert rec.nonzero_params < 0.2 * rec.params


def test_input_shape_that_does_not_fit_is_one_clear_line():
    with pytest.raises(TorchslimError) as err:
        measure(mlp(), input_shape=(3, 32, 32), threads=1, min_run_time=TINY)
    msg = str(err.value)
    assert msg.startswith("input shape 1x3x32x32 does not fit model Sequential: ")
    assert "--input-shape C,H,W" in msg and "--input SHAPE:DTYPE" in msg and "\n" not in msg


def test_class_mismatch_is_an_error(digits):
    with pytest.raises(TorchslimError, match="outputs 5 classes but digits has 10"):
        measure(mlp(classes=5), data=digits, threads=1, min_run_time=TINY)


def test_data_shape_mismatch_is_an_error(digits16):
    with pytest.raises(TorchslimError, match="samples of shape 1x16x16"):
        measure(conv_net(), input_shape=(1, 8, 8), data=digits16, min_run_time=TINY)


def test_missing_input_shape_is_an_error():
    with pytest.raises(TorchslimError, match="no input shape known"):
        measure(mlp(), min_run_time=TINY)


def test_torchscript_runtime(trained_mlp, digits):
    scripted = torch.jit.script(trained_mlp)
    rec = measure(scripted, data=digits, threads=1, min_run_time=TINY)
    eager = measure(trained_mlp, data=digits, threads=1, min_run_time=TINY)
    assert rec.runtime == "torchscript" and eager.runtime == "torch"
    assert (rec.params, rec.macs, rec.accuracy) == (eager.params, eager.macs, eager.accuracy)


# ------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_file(trained_mlp, tmp_path_factory):
    import onnx

    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    batch = torch.export.Dim("batch")
    # torch's exporter keeps the weights in mlp.onnx.data beside the graph
    torch.onnx.export(trained_mlp, (torch.randn(2, 1, 8, 8),), str(path), dynamo=True,
                      dynamic_shapes=({0: batch},), verbose=False)
    assert path.with_name("mlp.onnx.data").exists()
    inline = path.with_name("mlp_macs.onnx")  # one file, with MACs recorded
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=MACS_METADATA_KEY, value="2368")
    onnx.save(proto, str(inline))
    return path, inline


def test_onnx_measures_like_torch(onnx_file, trained_mlp, digits):
    path, inline = onnx_file
    rec = measure(load_model(path), data=digits, threads=1, batch_size=8, min_run_time=TINY)
    one_file = measure(load_model(inline), min_run_time=TINY)
    eager = measure(trained_mlp, data=digits, threads=1, batch_size=8, min_run_time=TINY)
    assert rec.runtime == "onnxruntime" and rec.model == "mlp.onnx"
    assert rec.params == rec.nonzero_params == eager.params  # int64 shape constants excluded
    assert rec.input_shape == (1, 8, 8)  # from the graph's static input dims
    assert rec.accuracy == pytest.approx(eager.accuracy) and rec.top5 == pytest.approx(eager.top5)
    data_file = path.with_name("mlp.onnx.data")
    assert rec.file_bytes == path.stat().st_size + data_file.stat().st_size
    assert path.stat().st_size < 4 * rec.params < rec.file_bytes  # the graph alone is not it
    assert one_file.file_bytes == inline.stat().st_size
    # MACs are counted from the graph (the file's own stated figure only agrees with it here)
    assert rec.macs == one_file.macs == eager.macs == 2368
    assert rec.state_dict_bytes == one_file.state_dict_bytes
    assert 0 < rec.latency_ms_median <= rec.latency_ms_p90
    assert rec.batch_latency_ms_median > 0


def test_onnx_int8_counts_weights_once(onnx_file, tmp_path, trained_mlp):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q8 = tmp_path / "mlp_int8.onnx"
    quantize_dynamic(str(onnx_file[0]), str(q8), weight_type=QuantType.QInt8)
    rec = measure(load_model(q8), threads=1, min_run_time=TINY)
    fp32 = measure(load_model(onnx_file[1]), threads=1, min_run_time=TINY)
    assert rec.params == fp32.params == sum(p.numel() for p in trained_mlp.parameters())
    assert rec.state_dict_bytes == pytest.approx(fp32.state_dict_bytes, rel=0.02)
    assert rec.file_bytes < 0.6 * fp32.file_bytes  # 1 byte per weight, plus graph overhead
    assert rec.nonzero_params >= 0.95 * rec.params  # int8 zeros are zero-point values


def test_onnx_with_fixed_batch_measures_batch_one_only(tmp_path, trained_mlp, digits):
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(trained_mlp, (torch.randn(1, 1, 8, 8),), str(path), dynamo=True,
                      external_data=False, verbose=False)
    rec = measure(load_model(path), data=digits, threads=1, min_run_time=TINY)
    eager = measure(trained_mlp, data=digits, threads=1, min_run_time=TINY)
    assert rec.file_bytes == path.stat().st_size  # one file, weights inline
    assert rec.batch_latency_ms_median is None and "fixed batch of 1" in rec.notes[0]
    assert rec.latency_ms_median > 0
    assert rec.accuracy == pytest.approx(eager.accuracy)  # evaluated one image at a time
