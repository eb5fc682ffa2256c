"""ONNX export and ONNX Runtime int8 quantization: the route torchslim's `quantize` uses.

Why ONNX Runtime: measured on this project's CPU (2 cores, AVX-512 VNNI), a static QDQ int8
model runs 2.8-2.9x faster than the fastest fp32 runtime, and the file reloads in a fresh
process with nothing but ``onnxruntime`` (see README, "Quantization"). The torch-native route
(torchao PT2E + torch.compile) is as fast but needs a compile at every load.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import TorchslimError
from .inputs import resolve

INPUT = "input"
OUTPUT = "output"
META_KEY = "torchslim"  # io.load_model reads ModelMeta from this metadata_props key

# Ops that carry the arithmetic; left as these names after ORT's QDQ fusion they run in fp32.
HEAVY_FP32 = {
    "Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
    "LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention",
}
INT8_OPS = {
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
    "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax",
}
# Ops that move values between float and int8: what a QDQ graph pays around int8 kernels.
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Elementwise ops worth naming when they stay in fp32 (cheap, but each costs a Q/DQ pair).
ELEMENTWISE = {"Add", "Mul", "Sigmoid", "HardSigmoid", "HardSwish", "Softmax", "Div", "Sub"}


def first_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and quantizer print progress to stdout; stdout is for our results."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "onnxruntime", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class ExportRoot(nn.Module):
    """The model one level down. torch.export builds a GraphModule whose own attributes
    (``meta``, ``graph``, ``code``...) would clash with a user's top-level submodule of that
    name (a ``self.meta = nn.Linear`` fails to export); nested, the names cannot collide."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor):
        return self.model(*xs)


def export_args(model: nn.Module, spec) -> tuple[nn.Module, tuple, tuple]:
    """(root module, example inputs, dynamic shapes) for torch.export / torch.onnx.export,
    with a dynamic batch axis on every input. The example has batch 2: at batch 1 the
    exporter specialises the batch dimension to a constant."""
    from .artifact import ExportedModule

    model = model.eval()
    if isinstance(model, ExportedModule):  # a loaded .pt2: export its graph again
        model = model.graph
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = spec.example(2)
    return ExportRoot(model), example, (tuple({0: batch} for _ in example),)


def export_onnx(model: nn.Module, inputs, path: Path) -> Path:
    """Export eval-mode ``model`` to one self-contained ONNX file with a dynamic batch axis.

    ``inputs`` is an InputSpec (or a (C, H, W) shape for one float image input). A single
    input is named ``input``; several keep ``forward``'s parameter names.
    """
    spec = resolve(inputs, model=model)
    root, example, dynamic = export_args(model, spec)
    names = input_names(root.model, len(spec.tensors))  # a loaded .pt2's graph names them
    # At batch 2 the batch axis stays dynamic; at batch 1 torch.export specialises some ops
    # (an LSTM's hidden state) and the exporter silently falls back to a graph fixed at
    # batch 1. Batch 1 remains the fallback for models that fix their batch themselves.
    try:
        _export(root, example, dynamic, names, path)
        if fixed_batch(path) is None:
            return _strip_debug_info(path)
    except Exception:  # retried at batch 1 below, whose error is the one reported
        pass
    try:
        _export(root, spec.example(1), dynamic, names, path)
    except Exception as exc:  # the exporter raises many types; its reason is what matters
        reason = _root_cause(exc)
        raise TorchslimError(
            f"cannot export the model to ONNX: {reason}; {export_advice(reason)}") from exc
    return _strip_debug_info(path)


def _export(root: nn.Module, example: tuple, dynamic: tuple, names: list[str],
            path: Path) -> None:
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            root, example, str(path), input_names=names, output_names=[OUTPUT],
            dynamo=True, external_data=False, verbose=False, dynamic_shapes=dynamic,
        )


def input_names(model: nn.Module, n: int) -> list[str]:
    """``input`` for one input; ``forward``'s own parameter names for several, so a runtime
    user feeds ``{"tokens": ..., "mask": ...}`` as the model's author named them."""
    if n == 1:
        return [INPUT]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        params = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in params if p.kind in kinds][:n]
    except (TypeError, ValueError):
        names = []
    return names if len(set(names)) == n else [f"input{i}" for i in range(n)]


# The GraphModule torch.export builds has attributes of its own (meta, graph, code, ...); a
# submodule of the same name cannot be put back into it (torch 2.13).
_NAME_CLASH = re.compile(r"references nonexistent attribute \S+ of (\S+)")


def export_advice(reason: str) -> str:
    """What to do about a torch.export failure, from its root-cause message."""
    clash = _NAME_CLASH.search(reason)
    if clash:
        name = clash.group(1).rsplit(".", 1)[-1]
        return (f"the model has a submodule named {name!r}, a name torch.export's GraphModule "
                f"uses itself; rename that attribute in your model (e.g. self.{name}_net) "
                "and save it again, or write .pt")
    return "make forward() traceable by torch.export (no data-dependent Python control flow)"


def _root_cause(exc: BaseException) -> str:
    """The exporter wraps torch.export's error in pages of advice; the innermost says why."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))


def _strip_debug_info(path: Path) -> Path:
    """Drop the exporter's per-node stack traces and FX dumps: ~0.5 KB a node, local file
    paths included, and nothing a runtime reads. Kept, they are 10 % of a small int8 file.
    """
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(proto, str(path))
    return path


def preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-pass: constant folding, Conv+BN fusion, shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    return dst


def calibration_batches(
    dataset, batches: int, batch_size: int, seed: int = 0
) -> list[tuple[np.ndarray, ...]]:
    """Deterministic random sample of the training set: per batch, one array per input."""
    xs = dataset.tensors[:-1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(xs[0]), generator=gen)[: batches * batch_size]
    return [tuple(x[idx[i : i + batch_size]].numpy() for x in xs)
            for i in range(0, len(idx), batch_size)]


def graph_inputs(path: Path | str) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def quantize_static_onnx(
    src: Path,
    dst: Path,
    calib: list[np.ndarray],
    *,
    per_channel: bool = True,
    exclude: Sequence[str] = (),
    calibrate: str = "minmax",
    reduce_range: bool = False,
) -> Path:
    """int8 weights (per-channel, symmetric) and uint8 activations as QDQ pairs.

    ``reduce_range`` keeps weights in 7 bits, for CPUs whose int8 kernels saturate (hw.py).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batch = fixed_batch(src)
    if batch:  # the exporter specialised the batch axis: feed that many samples at a time
        calib = [tuple(a[i : i + batch] for a in c) for c in calib
                 for i in range(0, len(c[0]) - batch + 1, batch)]
    names = graph_inputs(src)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            arrays = next(self.it, None)
            return None if arrays is None else dict(zip(names, arrays, strict=True))

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with _quiet():
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            # U8S8 is the fast pairing on x86 (VNNI); see ORT's quantization docs.
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude) or None, calibrate_method=methods[calibrate],
            reduce_range=reduce_range,
        )
    return dst


# Ops a graph output may pass through after the layer that computes it.
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Softmax",
                 "LogSoftmax", "Relu", "Sigmoid", "Transpose", "Cast"}


def output_layers(path: Path | str) -> list[str]:
    """Names of the Gemm/MatMul/Conv nodes whose results are the graph's outputs (through
    reshapes and activations): the layers whose int8 noise lands on the logits directly."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    found = []
    for out in graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Gemm", "MatMul", "Conv") and node.name:
            found.append(node.name)
    return list(dict.fromkeys(found))


DYNAMIC_OPS = ["MatMul", "Gemm", "LSTM", "Attention"]


def quantize_dynamic_onnx(
    src: Path, dst: Path, *, per_channel: bool = False, exclude: Sequence[str] = (),
    reduce_range: bool = False,
) -> Path:
    """int8 weights; activations quantized per batch at run time (MatMulInteger, DQ-LSTM).

    ``reduce_range`` keeps weights in 7 bits, for CPUs whose int8 kernels saturate (hw.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=per_channel,
            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude) or None,
            reduce_range=reduce_range,
        )
    return dst


# --- running and inspecting ---------------------------------------------------------------


def session(path: Path | str, threads: int | None = None, optimized_out: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_out is not None:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized_out)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TorchslimError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc


def fixed_batch(path: Path | str) -> int | None:
    """The input's batch size when the graph fixes it (None when the axis is dynamic)."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type
    first = dim.shape.dim[0] if dim.shape.dim else None
    return int(first.dim_value) if first is not None and first.HasField("dim_value") else None


class OnnxRunner:
    """An ONNX file as a callable ``(*tensors) -> tensor``, so train.evaluate can score it."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        self.sess = session(path, threads)
        self.inputs = [(i.name, _NP_TYPES.get(i.type, np.float32)) for i in self.sess.get_inputs()]
        first = self.sess.get_inputs()[0].shape[0]
        self.batch = first if isinstance(first, int) else None

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        arrays = [x.detach().numpy().astype(t) for x, (_, t) in zip(xs, self.inputs, strict=True)]
        step = self.batch or len(arrays[0])
        outs = [self.sess.run(None, {n: a[i : i + step] for (n, _), a in
                                     zip(self.inputs, arrays, strict=True)})[0]
                for i in range(0, len(arrays[0]), step)]
        return torch.from_numpy(np.concatenate(outs))


# ONNX Runtime's input type strings -> the numpy dtype to feed.
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def runtime_ops(path: Path, workdir: Path) -> list[tuple[str, str]]:
    """(op_type, node name) of the graph ORT really runs, after its QDQ -> int8-kernel fusion."""
    import onnx

    optimized = workdir / f"{path.stem}.ort-optimized.onnx"
    session(path, threads=1, optimized_out=optimized)
    graph = onnx.load(str(optimized)).graph
    return [(n.op_type, n.name) for n in graph.node]


def summarize_ops(ops: list[tuple[str, str]]) -> dict:
    """Which kernels run int8 and which compute nodes fell back to fp32 (named)."""
    int8 = Counter(t for t, _ in ops if t in INT8_OPS)
    heavy = [f"{name} ({t})" for t, name in ops if t in HEAVY_FP32]
    light = Counter(t for t, _ in ops if t in ELEMENTWISE)
    return {"int8_ops": dict(int8), "fp32_compute": heavy, "fp32_elementwise": dict(light)}


# --- metadata -----------------------------------------------------------------------------


def write_metadata(src: Path, dst: Path, meta: dict, macs: int | None = None) -> Path:
    """Copy ``src`` to ``dst`` with torchslim's metadata as a JSON string in metadata_props.

    ``macs`` (of the fp32 source: int8 does the same multiply-adds) goes under measure's key,
    since an ONNX graph cannot be run under torch's FLOP counter.
    """
    import onnx

    from .measure import MACS_METADATA_KEY

    proto = onnx.load(str(src))
    ours = {META_KEY: json.dumps(meta)}
    if macs is not None:
        ours[MACS_METADATA_KEY] = str(int(macs))
    props = [p for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    for key, value in ours.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "torchslim"
    _compact_tensor_names(proto.graph)
    onnx.save(proto, str(dst))
    return dst


def _compact_tensor_names(graph) -> None:
    """Rename internal tensors ``t0, t1, ...``: QDQ adds ~15 long names per layer (~1 KB),
    which is 5-8 % of a small int8 model. Node names, inputs and outputs stay as they are.
    """
    keep = {v.name for v in [*graph.input, *graph.output]} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for t in graph.initializer:
        t.name = short(t.name)
    for i, node in enumerate(graph.node):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = f"qdq{i}"  # added by the quantizer; compute nodes keep their names
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]  # inferred shapes: ORT infers them again at load


def read_metadata(path: Path | str) -> dict | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[META_KEY]) if META_KEY in props else None

