"""Per-layer int8 diagnosis: where does static int8 lose the model's signal?

"int8 lost accuracy and the tool does not say why" is the field's most common complaint.
This runs the fp32 ONNX graph and its static QDQ int8 version side by side on a few
training images (ONNX Runtime's own ``qdq_loss_debug`` tools collect every intermediate
tensor) and reports, for each compute layer (Conv / Gemm / MatMul), the SQNR of its output
against fp32 and how much noise the layer itself *adds* (the SQNR drop from its input to its
output). Layers that add the most are the ones worth keeping in fp32
(``QuantizeConfig.exclude`` takes their ONNX node names).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from . import onnx_quant as oq
from .errors import TorchslimError

COMPUTE = ("Conv", "Gemm", "MatMul", "ConvTranspose")
FOLDED = ("Relu", "Clip")  # activations the QDQ quantizer merges into the layer before
SQNR_CAP = 120.0  # dB; an exact copy would be infinite, which sorts and prints badly


@dataclass
class LayerError:
    """One compute layer of the int8 graph against the fp32 graph."""

    node: str  # ONNX node name (what QuantizeConfig.exclude takes)
    op: str
    sqnr_db: float  # output of the int8 model vs fp32 at this layer: higher is better
    rel_error: float  # ||int8 - fp32|| / ||fp32|| of the output
    added_db: float  # SQNR lost inside this layer (input SQNR - output SQNR)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Diagnosis:
    layers: list[LayerError]  # in graph order
    images: int  # calibration images the errors were measured on

    def worst(self, k: int) -> list[str]:
        """Node names of the ``k`` layers that add the most quantization noise."""
        ranked = sorted(self.layers, key=lambda lay: lay.added_db, reverse=True)
        return [lay.node for lay in ranked[:k]]

    def to_dict(self) -> dict:
        return {"images": self.images, "layers": [lay.to_dict() for lay in self.layers]}


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - got||)."""
    noise = float(np.linalg.norm(ref - got))
    signal = float(np.linalg.norm(ref))
    if noise == 0.0:
        return SQNR_CAP
    if signal == 0.0:
        return -SQNR_CAP
    return min(SQNR_CAP, 20.0 * math.log10(signal / noise))


def diagnose(module: nn.Module, input_shape, calib: list[tuple[np.ndarray, ...]], *,
             per_channel: bool = True, reduce_range: bool = False,
             calibrate: str = "minmax", keep_output_fp32: bool = True) -> Diagnosis:
    """Quantize ``module`` statically on ``calib`` batches and compare it layer by layer.

    The quantization settings should be the ones the real int8 model will use, so the
    errors are the ones it will have. ``calib`` are batches (one array per input) of
    training samples: the same images calibrate and measure, as in any post-training quantization.
    ``keep_output_fp32`` mirrors quantize's default: the output layer is left fp32 here too.
    """
    with tempfile.TemporaryDirectory(prefix="torchslim-qdiag-") as tmp:
        tmp = Path(tmp)
        fp32 = oq.export_onnx(module, input_shape, tmp / "fp32.onnx")
        try:
            src = oq.preprocess(fp32, tmp / "pre.onnx")
        except Exception:  # the same fallback quantize takes
            src = fp32
        exclude = oq.output_layers(src) if keep_output_fp32 else []
        q = oq.quantize_static_onnx(src, tmp / "int8.onnx", calib, per_channel=per_channel,
                                    calibrate=calibrate, reduce_range=reduce_range,
                                    exclude=exclude)
        float_acts = _activations(src, tmp / "fp32-aug.onnx", calib)
        int8_acts = _activations(q, tmp / "int8-aug.onnx", calib)
        layers = _layer_errors(src, float_acts, int8_acts)
    if not layers:
        raise TorchslimError("no Conv/Gemm/MatMul layer found to diagnose in the ONNX graph")
    return Diagnosis(layers=layers, images=sum(len(c[0]) for c in calib))


def _activations(model: Path, augmented: Path, calib) -> dict[str, np.ndarray]:
    """Every float tensor of ``model`` on the calibration batches, concatenated."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    with oq._quiet():
        modify_model_output_intermediate_tensors(str(model), str(augmented))
        names = oq.graph_inputs(model)
        acts = collect_activations(str(augmented),
                                   iter([dict(zip(names, c, strict=True)) for c in calib]))
    return {k: np.concatenate([a.reshape(-1) for a in v]) for k, v in acts.items()}


def _dequantized(name: str, acts: dict[str, np.ndarray]) -> np.ndarray | None:
    """The int8 model's value of fp32 tensor ``name``: after its Q/DQ pair when it has one."""
    for suffix in ("_DequantizeLinear_Output", "_DequantizeLinear_Output_1", ""):
        if name + suffix in acts:
            return acts[name + suffix]
    return None


def _layer_errors(src: Path, float_acts, int8_acts) -> list[LayerError]:
    import onnx

    graph = onnx.load(str(src)).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: list[LayerError] = []
    for node in graph.node:
        if node.op_type not in COMPUTE or not node.output:
            continue
        name = _layer_output(node.output[0], consumers)
        ref, got = float_acts.get(name), _dequantized(name, int8_acts)
        if ref is None or got is None or ref.shape != got.shape:
            continue
        inp = node.input[0]
        ref_in, got_in = float_acts.get(inp), _dequantized(inp, int8_acts)
        in_db = (sqnr(ref_in, got_in) if ref_in is not None and got_in is not None
                 and ref_in.shape == got_in.shape else SQNR_CAP)
        out_db = sqnr(ref, got)
        rel = float(np.linalg.norm(ref - got) / max(float(np.linalg.norm(ref)), 1e-12))
        out.append(LayerError(node.name, node.op_type, out_db, rel, in_db - out_db))
    return out


def _layer_output(name: str, consumers: dict[str, list]) -> str:
    """A layer's output as the int8 graph has it: the quantizer folds a Relu/Clip that
    follows a Conv into the Conv's output range, so the tensor after it is what exists."""
    nxt = consumers.get(name, [])
    while len(nxt) == 1 and nxt[0].op_type in FOLDED:
        name = nxt[0].output[0]
        nxt = consumers.get(name, [])
    return name
