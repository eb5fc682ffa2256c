"""Per-node profile of an ONNX file with ONNX Runtime's own profiler (``enable_profiling``).

The rows are the nodes of the graph ORT really runs: after its fusions (QDQ pairs into
QLinearConv/QGemm, Conv+Relu into FusedConv) and layout changes (NCHWc blocks, NHWC for int8
convs), so they name what the time is spent on. Shapes come from the profile; weights, kernel
sizes and attributes from the same optimised graph, saved by a second session.

The profiler's own cost is taken out of every node: ORT records a node's time in whole
microseconds around its kernel *and* part of its own bookkeeping, measured here at 2-3 us for
a kernel that does nothing (0.4-1 us per node unprofiled), which would be 10-20 % of a
0.25 ms int8 CNN of 17 nodes. So each run first profiles a chain of 64 one-element ``Neg``
nodes in the same process with the same session options, and that mean recorded time per
node is subtracted from every node's (never below zero); the figure is in the result.

MACs follow measure.count_macs (FlopCounterMode): convolutions and matrix products only,
bias and elementwise ops free. ORT's NCHWc kernels pad channels to blocks of 8 or 16; such a
node's weights and MACs include the padding, which is real work (a note says so).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TorchslimError
from .onnx_quant import HEAVY_FP32, INT8_OPS, QDQ_OPS
from .profile import MAX_PROFILED_RUNS, MIN_PROFILED_RUNS, central_mean, central_total

WARMUP_RUNS = 3
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv"}
GEMM_OPS = {"Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul", "QLinearMatMul",
            "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
NO_MAC_FORMULA = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM", "Attention", "QAttention",
                  "MultiHeadAttention", "ConvTranspose", "Einsum", "MatMulNBits"}
# Inputs that are quantisation scales / zero points, not weights, per op.
QUANT_META = {
    "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2},
    "QLinearConv": {1, 2, 4, 5, 6, 7}, "QLinearMatMul": {1, 2, 4, 5, 6, 7},
    "QGemm": {1, 2, 4, 5, 7, 8}, "MatMulInteger": {2, 3}, "ConvInteger": {2, 3},
    "MatMulIntegerToFloat": {2, 3, 4, 5}, "DynamicQuantizeMatMul": {2, 3},
    "QLinearAdd": {1, 2, 4, 5, 6, 7}, "QLinearMul": {1, 2, 4, 5, 6, 7},
    "QLinearSigmoid": {1, 2, 3, 4}, "QLinearLeakyRelu": {1, 2, 3, 4},
    "QLinearGlobalAveragePool": {1, 2, 3, 4}, "QLinearAveragePool": {1, 2, 3, 4},
    "QLinearSoftmax": {1, 2, 3, 4},
}
_PRECISION = {"float": "fp32", "float16": "fp16", "double": "fp64", "bfloat16": "bf16",
              "uint8": "int8", "int8": "int8"}


def profile_onnx(path: Path, feed: dict[str, np.ndarray], *, threads: int,
                 min_run_time: float) -> dict[str, Any]:
    """Rows per node of the optimised graph, run on ``feed`` (input name -> array)."""
    with tempfile.TemporaryDirectory(prefix="torchslim-ortprof-") as tmp:
        nodes, inits, notes = _optimized_graph(Path(path), threads, Path(tmp))
        cost_us = _profiler_cost_us(threads, Path(tmp))
        events = _profile_events(Path(path), feed, threads, min_run_time, Path(tmp))
    per_run, totals, seen = _runs(events, cost_us)
    ms = central_mean(per_run, totals)
    rows = [_row(name, args, nodes.get(name), inits, ms.get(name, 0.0))
            for name, args in seen.items()]
    missing = sorted({r["type"] for r in rows if r["macs"] is None})
    if missing:
        notes.append(f"no MAC formula for {', '.join(missing)}: their MACs are not counted")
    if any(r["type"] in ("ReorderInput", "ReorderOutput") for r in rows):
        notes.append("NCHWc layout: ORT pads channels to its block size; padded weights and "
                     "MACs are counted as ORT computes them")
    return {"tool": "onnxruntime profiler", "runs": len(per_run), "rows": rows,
            "notes": notes, "profiled_run_ms": central_total(totals),
            "profiler_cost_us_per_node": cost_us,
            "outside_name": "(outside nodes: session and executor)", **_precision_summary(rows)}


def _session(path: Path, threads: int, **options):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads  # as measure_onnx.OnnxSubject runs it
    opts.inter_op_num_threads = 1
    for key, value in options.items():
        setattr(opts, key, value)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's exceptions derive from Exception only
        raise TorchslimError(f"onnxruntime cannot run {path}: {exc}"[:300]) from exc


def _optimized_graph(path: Path, threads: int, tmp: Path):
    """{node name: node} and {initializer name: tensor} of the graph ORT runs (default
    optimisation level, as timed), saved by a session of its own."""
    import onnx

    saved = tmp / "optimized.onnx"
    try:
        _session(path, threads, optimized_model_filepath=str(saved))
        graph = onnx.load(str(saved)).graph
    except Exception as exc:  # e.g. a graph over 2 GB cannot be saved in one file
        note = f"optimised graph not readable ({str(exc)[:120]}): no params or MACs per node"
        return {}, {}, [note]
    return {n.name: n for n in graph.node}, {t.name: t for t in graph.initializer}, []


def _profile_events(path: Path, feed: dict, threads: int, min_run_time: float,
                    tmp: Path) -> list:
    sess = _session(path, threads, enable_profiling=True, profile_file_prefix=str(tmp / "p"))
    for _ in range(WARMUP_RUNS):
        sess.run(None, feed)
    start, runs = time.perf_counter(), 0
    while runs < MAX_PROFILED_RUNS and (runs < MIN_PROFILED_RUNS
                                   or time.perf_counter() - start < min_run_time):
        sess.run(None, feed)
        runs += 1
    return json.loads(Path(sess.end_profiling()).read_text())


CHAIN = 64


def _profiler_cost_us(threads: int, tmp: Path) -> float:
    """Mean recorded time of a node whose kernel does nothing (Neg of one float), over the
    runs around the median: what the profiler adds to every node."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}")
             for i in range(CHAIN)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"t{CHAIN}", TensorProto.FLOAT, [1])])
    path = tmp / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    events = _profile_events(path, {"t0": np.ones(1, dtype=np.float32)}, threads, 0.05, tmp)
    per_run, totals, _ = _runs(events, 0.0)
    return float(sum(central_mean(per_run, totals).values()) / CHAIN * 1e3)


def _runs(events: list, cost_us: float) -> tuple[list[dict[str, float]], list[float],
                                                 dict[str, dict]]:
    """Per timed run: ms per node; each run's total (model_run); each node's profile args."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = runs[WARMUP_RUNS:]
    nodes = sorted((e for e in events if e.get("cat") == "Node"
                    and e["name"].endswith("_kernel_time")), key=lambda e: e["ts"])
    per_run: list[dict[str, float]] = []
    seen: dict[str, dict] = {}
    i = 0
    for run in runs:
        end = run["ts"] + run["dur"]
        row: dict[str, float] = defaultdict(float)
        while i < len(nodes) and nodes[i]["ts"] < end:
            e = nodes[i]
            i += 1
            if e["ts"] < run["ts"]:
                continue  # a warm-up run's node
            name = e["name"][: -len("_kernel_time")]
            row[name] += max(0.0, e["dur"] - cost_us) / 1e3
            seen.setdefault(name, e.get("args", {}))
        per_run.append(row)
    if not per_run:
        raise TorchslimError("onnxruntime's profile holds no timed runs; rerun with --min-time 1")
    return per_run, [r["dur"] / 1e3 for r in runs], seen


def _shapes(args: dict, key: str) -> list[tuple[str, list[int]]]:
    return [next(iter(d.items())) for d in args.get(key, []) if d]


def _row(name: str, args: dict, node, inits: dict, ms: float) -> dict[str, Any]:
    op = args.get("op_name") or (node.op_type if node is not None else "?")
    in_types = [t for t, _ in _shapes(args, "input_type_shape")]
    params, nbytes = _weights(node, inits) if node is not None else (None, None)
    return {"name": name, "type": op, "params": params, "macs": _macs(op, args, node, inits),
            "bytes": nbytes, "ms": ms, "precision": _precision(op, in_types), "calls": 1}


def _precision(op: str, in_types: list[str]) -> str | None:
    if op in QDQ_OPS:
        return "q/dq"
    if op in INT8_OPS:
        return "int8"
    return _PRECISION.get(in_types[0], in_types[0]) if in_types else None


def _weights(node, inits: dict) -> tuple[int, int]:
    """(parameters, bytes) of the node's weight initializers: no scales, zero points or
    int64 shape constants."""
    from onnx.helper import tensor_dtype_to_np_dtype

    meta = QUANT_META.get(node.op_type, set())
    params = nbytes = 0
    for i, name in enumerate(node.input):
        t = inits.get(name)
        if t is None or i in meta or not t.dims or t.data_type == 7:  # 7: int64
            continue
        n = math.prod(t.dims)
        params += n
        nbytes += n * np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return params, nbytes


def _macs(op: str, args: dict, node, inits: dict) -> int | None:
    if op in NO_MAC_FORMULA:
        return None
    if op not in CONV_OPS and op not in GEMM_OPS:
        return 0
    outs = _shapes(args, "output_type_shape")
    if not outs:
        return None
    out = math.prod(outs[0][1])
    if op in CONV_OPS:  # out elements x (C_in / groups x kernel): the weight's dims 1..
        w = inits.get(node.input[3 if op == "QLinearConv" else 1]) if node is not None else None
        return out * math.prod(w.dims[1:]) if w is not None else None
    ins = _shapes(args, "input_type_shape")
    if not ins or not ins[0][1]:
        return None
    a = ins[0][1]
    trans_a = any(at.name == "transA" and at.i for at in node.attribute) if node else False
    k = a[0] if trans_a and len(a) == 2 else a[-1]  # the reduced dimension
    return out * k


def _precision_summary(rows: list[dict]) -> dict[str, Any]:
    """Nodes and ms per precision; for an int8 graph, the compute nodes left in fp32."""
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["precision"] is None:
            continue
        slot = by.setdefault(r["precision"], {"nodes": 0, "ms": 0.0})
        slot["nodes"] += 1
        slot["ms"] += r["ms"]
    out: dict[str, Any] = {"by_precision": by}
    if "int8" in by or "q/dq" in by:
        out["fp32_compute"] = [r["name"] for r in rows
                               if r["precision"] == "fp32" and r["type"] in HEAVY_FP32]
        out["qdq_ms"] = by.get("q/dq", {}).get("ms", 0.0)
    return out
