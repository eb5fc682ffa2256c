"""Measurement: one record (:class:`Measurement`) that every table, JSON file and plot renders.

Everything here is measured, never estimated: parameters are counted on the tensors, sizes
come from serialising, MACs from a real forward pass under ``FlopCounterMode`` (plus
formulas for the CPU kernels it cannot see), latency from per-call timing (latency.py).
"""

from __future__ import annotations

import gzip
import io
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .bounds import check_inputs, check_onnx_run, check_torch
from .device import off_cpu
from .errors import TorchslimError
from .hw import environment
from .inputs import InputSpec, as_spec, call
from .latency import (
    DEFAULT_MIN_RUN_TIME,
    LatencyStats,
    PeakMemory,
    measure_latency,
    noise_warning,
    stats_fields,
    throughput,
)
from .latency import torch_threads as _torch_threads

__all__ = ["DEFAULT_MIN_RUN_TIME", "LatencyStats", "Measurement", "count_macs", "count_params",
           "environment", "measure", "measure_latency"]

# ONNX metadata key under which an exporter records the MACs of the fp32 graph; int8 graphs
# keep the MACs of the model they came from (their integer ops are not "fewer MACs").
MACS_METADATA_KEY = "torchslim.macs"


@dataclass
class Measurement:
    """What one model costs. Accuracies are percentages; sizes are bytes."""

    model: str  # display name
    runtime: str  # "torch" | "torchscript" | "onnxruntime"
    params: int
    nonzero_params: int
    file_bytes: int | None  # the file as given; None for an in-memory model
    state_dict_bytes: int  # the same weights as a plain fp32 state_dict, serialised
    compressed_bytes: int | None  # gzip -6 of the file: the honest size of sparse weights
    macs: int | None  # per sample (batch 1)
    input_shape: tuple[int, ...]  # the (first) input's sample shape, no batch dimension
    latency_ms_median: float  # batch 1
    latency_ms_p90: float
    batch_size: int
    batch_latency_ms_median: float | None  # whole batch of batch_size
    batch_latency_ms_p90: float | None
    threads: int
    accuracy: float | None  # top-1 % on the data's validation split
    top5: float | None  # None without data or with five classes or fewer
    env: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # every input, as --input writes it
    # --- benchmark statistics (latency.py); latency_* is batch 1, batch_latency_* batch N
    precision: str | None = None  # "fp32" | "fp16" | "bf16" | "int8" | "int8-weights"
    cold_ms: float | None = None  # the very first call (batch 1), before any warm-up
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_min: float | None = None
    latency_ms_mean: float | None = None
    latency_cv: float | None = None  # std / mean of the timed calls
    latency_runs: int | None = None  # timed calls
    latency_seconds: float | None = None  # their wall time together
    batch_latency_ms_p95: float | None = None
    batch_latency_ms_p99: float | None = None
    batch_latency_ms_min: float | None = None
    batch_latency_ms_mean: float | None = None
    batch_latency_cv: float | None = None
    batch_latency_runs: int | None = None
    batch_latency_seconds: float | None = None
    throughput_per_s: float | None = None  # items/s at batch_size: items timed / seconds
    peak_rss_delta_bytes: int | None = None  # process peak RSS while running, minus before
    warnings: list[str] = field(default_factory=list)  # e.g. noisy timings
    # --- filled by other steps: agreement.py (against a reference), profile.py (--layers)
    fidelity_top1_agreement: float | None = None  # % of inputs with the reference's top-1
    fidelity_rel_error: float | None = None  # ||out - ref|| / ||ref|| over the inputs
    layers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


# ---------------------------------------------------------------------------- counting


# Integer storage that only quantized weights use (int8 weight-only layers keep their weight
# as an int8 buffer); int64 counters such as BatchNorm's num_batches_tracked are not weights.
QUANT_STORAGE = (torch.int8, torch.uint8)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameters; a shared parameter counts once.

    Equals ``sum(p.numel() for p in model.parameters())`` for ordinary models. Quantized
    weights held as int8/uint8 buffers count as the parameters they replace. Weights pruned
    with ``torch.nn.utils.prune`` keep a dense ``X_orig`` and a ``X_mask`` buffer; their
    non-zeros are those of ``X_orig * X_mask``, which is what the model computes with.
    """
    seen: set[int] = set()
    total = nonzero = 0
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        quantized = [(n, b) for n, b in buffers.items() if b.dtype in QUANT_STORAGE]
        for name, p in [*module.named_parameters(recurse=False), *quantized]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            mask = buffers.get(name[: -len("_orig")] + "_mask") if name.endswith("_orig") else None
            values = p.detach() if mask is None else p.detach() * mask
            nonzero += int(torch.count_nonzero(values))
    return total, nonzero


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


# FlopCounterMode formulas receive shapes for tensors and return FLOPs (2 per MAC).
def _rnn_layer_flops(inp, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """aten.mkldnn_rnn_layer: one layer, one direction of an LSTM/GRU/RNN on CPU.

    Every step multiplies the layer input by w_ih (gates*hidden, in) and the previous hidden
    state by w_hh (gates*hidden, hidden): the textbook 4*(in*hid + hid*hid) for an LSTM.
    """
    tokens = _prod(inp) // int(w_ih[1])  # time steps x batch
    return 2 * tokens * (_prod(w_ih) + _prod(w_hh))


def _attention_core_flops(batch_heads: int, q_len: int, kv_len: int, qk_dim: int, v_dim: int):
    return 2 * batch_heads * q_len * kv_len * (qk_dim + v_dim)  # Q K^T, then softmax(.) V


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu; shapes (B, H, L, E)."""
    return _attention_core_flops(_prod(query[:-2]), query[-2], key[-2], query[-1], value[-1])


def _native_mha_flops(query, key, value, embed_dim, num_heads, qkv_w, qkv_b, proj_w, *args,
                      out_shape=None, **kwargs) -> int:
    """aten._native_multi_head_attention: nn.MultiheadAttention's eval fast path."""
    batch, q_len, kv_len = _prod(query[:-2]), int(query[-2]), int(key[-2])
    e = int(embed_dim)
    projections = batch * (q_len + 2 * kv_len) * e * e + batch * q_len * _prod(proj_w)
    return 2 * projections + _attention_core_flops(batch, q_len, kv_len, e, e)


def _encoder_layer_flops(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu,
                         norm_first, eps, nw1, nb1, nw2, nb2, ffn_w1, ffn_b1, ffn_w2, *args,
                         out_shape=None, **kwargs) -> int:
    """aten._transformer_encoder_layer_fwd: nn.TransformerEncoderLayer's eval fast path."""
    batch, length = _prod(src[:-2]), int(src[-2])
    weights = _prod(qkv_w) + _prod(proj_w) + _prod(ffn_w1) + _prod(ffn_w2)
    e = int(embed_dim)
    return 2 * batch * length * weights + _attention_core_flops(batch, length, length, e, e)


_aten = torch.ops.aten
# Kernels FlopCounterMode (torch 2.13) runs without counting: a plain LSTM on CPU goes to
# oneDNN, MultiheadAttention / TransformerEncoderLayer in eval take fused fast paths, and
# scaled_dot_product_attention on CPU has no formula. GRU/RNN and LSTM with proj_size
# decompose into addmm, which it already counts.
EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten.mkldnn_rnn_layer: _rnn_layer_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._native_multi_head_attention: _native_mha_flops,
    _aten._transformer_encoder_layer_fwd: _encoder_layer_flops,
}


def count_macs(model: nn.Module, example_input) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (a tensor or tuple).

    Counted on a real forward pass under ``FlopCounterMode`` (FLOPs / 2), so convolutions
    (grouped and depthwise included) and linears agree with it exactly, plus the kernels it
    misses (see ``EXTRA_FLOP_FORMULAS``). Each op is counted once, where it actually runs.
    """
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with _eval_mode(model), torch.inference_mode(), counter:
        call(model, example_input)
    return counter.get_total_flops() // 2


@contextmanager
def _eval_mode(model):
    """Put a module in eval mode and give every submodule its own training flag back."""
    flags = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    for m, _ in flags[:1]:
        m.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ---------------------------------------------------------------------------- accuracy


def accuracy(fn: Callable, dataset, batch_size: int = 256) -> tuple[float, float | None]:
    """Top-1 and top-5 % of ``fn`` on a TensorDataset (top-5 None for <= 5 classes)."""
    from .train import evaluate  # one evaluation loop for training and measuring

    return evaluate(fn, dataset, batch_size)


# ---------------------------------------------------------------------------- sizes


def state_dict_bytes(state: dict[str, Any]) -> int:
    """Bytes of ``torch.save`` of the state with every weight as fp32 (counters stay int)."""
    plain = OrderedDict((k, _as_fp32(v)) for k, v in state.items() if isinstance(v, torch.Tensor))
    if hasattr(state, "_metadata"):  # keep what torch.save(model.state_dict()) would write
        plain._metadata = state._metadata
    buf = io.BytesIO()
    torch.save(plain, buf)
    return buf.tell()


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    if t.is_quantized:
        return t.dequantize()
    if t.is_floating_point() or t.dtype in QUANT_STORAGE:
        return t.detach().float()
    return t.detach()


def gzip_bytes(paths: list[Path]) -> int:
    """Size of the files gzipped at level 6 (what ``gzip -6`` makes of them, in one stream)."""
    return len(gzip.compress(b"".join(Path(p).read_bytes() for p in paths), compresslevel=6))


# ---------------------------------------------------------------------------- subjects
# A subject is what measure() runs: an eager/TorchScript module or an onnxruntime session
# (measure_onnx.OnnxSubject), behind one small interface so every figure is taken the same
# way for both.


_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
              torch.float64: "fp64"}


class _TorchSubject:
    fixed_batch = None
    static_spec = None

    def __init__(self, model: nn.Module):
        self.model = model
        scripted = isinstance(model, torch.jit.ScriptModule)
        self.runtime = "torchscript" if scripted else "torch"
        self.default_name = model.original_name if scripted else type(model).__name__
        floats = (p.dtype for p in model.parameters() if p.is_floating_point())
        self.dtype = next(floats, torch.float32)

    def forward(self, *xs: torch.Tensor):
        return self.model(*xs)

    def timed(self, xs: tuple):
        return self.model(*xs)

    def precision(self) -> str:
        from .runtime import CastWrapper, Int8WeightLayer  # torchslim's reduced-precision .pt

        for m in self.model.modules():
            if isinstance(m, CastWrapper):
                return _PRECISION.get(getattr(torch, m.storage), m.storage)
            if isinstance(m, Int8WeightLayer):
                return "int8-weights"  # stored int8, computed in fp32
        return _PRECISION.get(self.dtype, str(self.dtype).removeprefix("torch."))

    def prepare(self, xs: tuple) -> tuple:
        return xs

    def count_params(self) -> tuple[int, int]:
        return count_params(self.model)

    def state_dict_bytes(self) -> int:
        return state_dict_bytes(self.model.state_dict())

    def macs(self, example: tuple) -> int:
        return count_macs(self.model, example)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:240] if lines else type(exc).__name__


# ---------------------------------------------------------------------------- measure()


def _open(target, threads: int):
    """(subject, the files it came from, metadata input spec) for a module or LoadedModel."""
    if isinstance(target, nn.Module):
        return _TorchSubject(target), [], None
    kind = getattr(target, "kind", None)
    if kind is None:
        raise TorchslimError(f"cannot measure a {type(target).__name__}; pass an nn.Module, "
                             "a ScriptModule or a model loaded with load_model()")
    meta = getattr(target, "meta", None)
    meta_spec = meta.input_spec() if meta is not None else None
    path = Path(target.path) if target.path else None
    if kind == "onnx":
        from .measure_onnx import OnnxSubject  # onnx and onnxruntime load only when needed

        subject = OnnxSubject(path, threads)
        return subject, subject.files, meta_spec
    subject = _TorchSubject(target.model)
    if path is not None:
        subject.default_name = path.name
    return subject, [path] if path is not None else [], meta_spec


def _resolve_spec(explicit, meta_spec, subject, data, name: str) -> InputSpec:
    """Explicit > file metadata (torchslim meta, then a static ONNX input) > the data."""
    data_spec = None
    if data is not None:
        data_spec = data.inputs if hasattr(data, "inputs") else \
            InputSpec.from_tensors([t[:1] for t in _val(data).tensors[:-1]])
    for spec in (as_spec(explicit), meta_spec, subject.static_spec, data_spec):
        if spec is not None:
            model = getattr(subject, "model", None)
            return spec.with_vocab(model) if isinstance(model, nn.Module) else spec
    raise TorchslimError(f"no input shape known for {name}: pass --input-shape C,H,W "
                         "(or --input SHAPE:DTYPE per input, or --data, whose samples give it)")


def _val(data):
    """The evaluation split: a DataSplit's val, or a dataset given as it is."""
    return getattr(data, "val", data)


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _require_cpu(subject, name: str) -> None:
    """Latency is timed on the CPU, where these models ship: a module left on a GPU (or
    any other device) is a caller's bug, said as one, not blamed on the input shape."""
    model = getattr(subject, "model", None)
    where = off_cpu(model) if isinstance(model, nn.Module) else None
    if where is not None:
        raise TorchslimError(
            f"model {name} has weights on {where}, but torchslim measures on the CPU; "
            "move it there first (model.cpu()): training may use a GPU, measuring does not")


def _trial(subject, example: tuple, spec: InputSpec, name: str) -> torch.Tensor:
    try:
        with torch.inference_mode():
            out = subject.forward(*example)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        if "same device" in str(exc) or "device type" in str(exc):
            raise TorchslimError(
                f"model {name} computes on a device other than the CPU: {_first_line(exc)}; "
                "torchslim measures on the CPU, so its forward must not move tensors to a "
                "GPU") from exc
        raise TorchslimError(
            f"input shape {spec.describe()} does not fit model {name}: {_first_line(exc)}; "
            "state the model's input with --input-shape C,H,W, or --input SHAPE:DTYPE per input "
            "(e.g. --input 1,20:int64)") from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TorchslimError(f"model {name} returned {type(out).__name__}, not a tensor of "
                             "logits; measure a model whose forward returns a tensor")
    return out


def _check_data(out: torch.Tensor, data, spec: InputSpec, name: str) -> None:
    val = _val(data)
    if len(val) == 0:
        raise TorchslimError(f"the validation split of {_data_name(data)} is empty; "
                             "use more data or a larger validation fraction")
    samples = [tuple(t.shape[1:]) for t in val.tensors[:-1]]
    wanted = [t.sample_shape for t in spec.tensors]
    if samples != wanted:
        got = ", ".join(_dims(s) for s in samples)
        raise TorchslimError(
            f"{_data_name(data)} has samples of shape {got} but {name} is measured at "
            f"{', '.join(_dims(s) for s in wanted)}; resize the data (--image-size/--channels) "
            "or state the model's input (--input-shape / --input) to match")
    classes = getattr(data, "num_classes", None) or int(val.tensors[-1].max()) + 1
    if out.dim() != 2 or out.shape[1] != classes:
        got = out.shape[1] if out.dim() == 2 else f"shape {_dims(out.shape)}"
        raise TorchslimError(
            f"model {name} outputs {got} classes but {_data_name(data)} has {classes}; "
            "use data with the model's classes (or retrain the classifier)")


def _data_name(data) -> str:
    return getattr(data, "name", "the data")


def _example(spec: InputSpec, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Generated inputs; float inputs in the model's own float dtype (an fp16 pickle)."""
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in spec.example(batch))


def measure(target, *, name: str | None = None, input_shape=None, data=None,
            threads: int | None = None, batch_size: int = 32,
            min_run_time: float | None = None, inputs: InputSpec | None = None) -> Measurement:
    """Measure a module, ScriptModule or LoadedModel (ONNX files run in onnxruntime).

    ``inputs`` (an InputSpec) or ``input_shape`` (one float input's sample shape, e.g.
    (1, 60, 120)) says what the model takes; otherwise the file's metadata or the data does.
    ``data`` (a DataSplit, or a dataset) adds accuracy on its validation split. ``threads``
    defaults to torch's current intra-op thread count; ``min_run_time`` is seconds of timing
    per batch.
    """
    threads = int(threads or torch.get_num_threads())
    run_time = DEFAULT_MIN_RUN_TIME if min_run_time is None else float(min_run_time)
    subject, files, meta_spec = _open(target, threads)
    name = name or subject.default_name
    spec = _resolve_spec(inputs or input_shape, meta_spec, subject, data, name)
    _require_cpu(subject, name)
    # every step runs on the recorded thread count, accuracy and MAC counting included
    check_inputs(spec, batch_size)
    with _eval_mode(getattr(subject, "model", None)), _torch_threads(threads):
        example = _example(spec, 1, subject.dtype)
        _check_work(subject, spec, example, batch_size, name)
        with PeakMemory() as memory:  # peak RSS while the model runs (cold call and timing)
            start = time.perf_counter()
            out = _trial(subject, example, spec, name)
            cold_ms = (time.perf_counter() - start) * 1e3
            if data is not None:
                _check_data(out, data, spec, name)
            lat, batch_lat, notes = _latencies(subject, spec, threads, batch_size, run_time)
        params, nonzero = subject.count_params()
        top1, top5 = (None, None) if data is None else _accuracy(subject, data, batch_size)
        macs = _macs(subject, example, notes)
    noisy = noise_warning({"batch 1": lat, f"batch {batch_size}": batch_lat})
    return Measurement(
        model=name, runtime=subject.runtime, params=params, nonzero_params=nonzero,
        file_bytes=sum(f.stat().st_size for f in files) if files else None,
        state_dict_bytes=subject.state_dict_bytes(),
        compressed_bytes=gzip_bytes(files) if files else None, macs=macs,
        input_shape=spec.tensors[0].sample_shape, latency_ms_median=lat.median_ms,
        latency_ms_p90=lat.p90_ms, batch_size=batch_size,
        batch_latency_ms_median=batch_lat.median_ms if batch_lat else None,
        batch_latency_ms_p90=batch_lat.p90_ms if batch_lat else None,
        threads=threads, accuracy=top1, top5=top5, env=environment(threads),
        notes=notes + ([memory.reason] if memory.reason else []), inputs=spec.texts(),
        precision=subject.precision(), cold_ms=cold_ms, **stats_fields("latency", lat),
        **stats_fields("batch_latency", batch_lat),
        throughput_per_s=throughput(batch_lat, batch_size),
        peak_rss_delta_bytes=memory.delta_bytes, warnings=[noisy] if noisy else [])


def _check_work(subject, spec, example: tuple, batch: int, name: str) -> None:
    """Refuse before running when one tensor of the pass would not fit (bounds.py)."""
    if getattr(subject, "proto", None) is not None:
        check_onnx_run(subject.proto, spec, batch, name)
    else:
        check_torch(getattr(subject, "model", None), example, batch, name)


def _macs(subject, example: torch.Tensor, notes: list[str]) -> int | None:
    """MACs, or None with a note: an op FlopCounterMode cannot run must not sink the report."""
    try:
        if getattr(subject, "proto", None) is not None:
            return subject.macs(example, notes)
        return subject.macs(example)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        notes.append(f"MACs not counted: {_first_line(exc)}")
        return None


def _latencies(subject, spec, threads: int, batch_size: int, run_time: float):
    """Batch-1 and batch-N latency; an ONNX graph with a fixed batch gets batch 1 only."""
    def timed(batch: int) -> LatencyStats:
        x = subject.prepare(_example(spec, batch, subject.dtype))
        return measure_latency(subject.timed, x, threads=threads, min_run_time=run_time)

    notes = []
    single = timed(1)
    if subject.fixed_batch is not None and subject.fixed_batch != batch_size:
        notes.append(f"graph has a fixed batch of {subject.fixed_batch}; "
                     f"batch-{batch_size} latency not measured")
        return single, None, notes
    return single, timed(batch_size), notes


def _accuracy(subject, data, batch_size: int):
    batch = subject.fixed_batch or max(batch_size, 256)
    return accuracy(subject.forward, _val(data), batch)
