"""MACs of an ONNX graph, counted by torchslim from its shapes, not read from its metadata.

An ONNX file may state its own MACs (``torchslim.macs`` in its metadata, written by
torchslim's exports): a file can state anything, so the count shown is the one made here
when every op that multiplies is one counted below; the stated figure is then only a
cross-check, and a disagreement is noted. Counted as torch's FlopCounterMode counts (FLOPs
/ 2): convolutions and matrix products; elementwise ops, norms and pooling count 0.
"""

from __future__ import annotations

from math import prod

from .bounds import infer_shapes, known_shapes

_CONV = {"Conv", "ConvInteger", "QLinearConv"}
_MATMUL = {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul"}
# ops with multiply-accumulates this count does not follow: a count with them is partial
_UNCOUNTED = {"LSTM", "GRU", "RNN", "Einsum", "Attention", "MultiHeadAttention",
              "DynamicQuantizeLSTM", "Loop", "Scan", "If", "ConvTranspose", "FusedConv",
              "QAttention", "DynamicQuantizeMatMul", "MatMulNBits", "QGemm"}


def graph_macs(proto, shapes) -> tuple[int | None, str]:
    """(MACs, "") of one pass with inputs of ``shapes``, or (None, why not)."""
    inferred = infer_shapes(proto, shapes)
    if inferred is None:
        return None, "shape inference cannot follow the graph"
    known = known_shapes(inferred)
    total = 0
    for node in inferred.graph.node:
        op = node.op_type
        if op in _UNCOUNTED:
            return None, f"the graph holds {op}, which torchslim does not count"
        if op not in _CONV and op not in _MATMUL:
            continue
        out = known.get(node.output[0], (None,))[0]
        w_index = 3 if op in ("QLinearConv", "QLinearMatMul") else 1
        a = known.get(node.input[0], (None,))[0]
        w = known.get(node.input[w_index], (None,))[0] if len(node.input) > w_index else None
        if out is None or (op in _CONV and w is None) or (op not in _CONV and a is None):
            return None, f"the shapes around {op} {node.name or ''} are not fixed"
        if op in _CONV:
            total += prod(out) * prod(w[1:])  # each output: C_in/groups x kernel products
        elif op == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            total += prod(out) * (a[0] if trans_a else a[-1])
        else:
            total += prod(out) * a[-1]
    return total, ""
