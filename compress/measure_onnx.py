"""The ONNX side of measurement: run a .onnx file in onnxruntime and count its weights.

Parameters are the initializers that hold weights, dtype-aware: float tensors, and int8/uint8
tensors that quantisation ops read as weights (their "zero" is the zero point); int64 shape
constants, scalars and quantisation scales/zero points are not parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bounds import check_onnx_run
from .errors import TorchslimError
from .inputs import InputSpec, TensorSpec
from .measure import MACS_METADATA_KEY, _first_line, state_dict_bytes

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
               "tensor(bool)": np.bool_}
# Per op: {quantized input index: its zero-point input index} and the inputs that are
# quantisation scales/zero points (not parameters of the model).
_QUANT_INPUTS: dict[str, tuple[dict[int, int], set[int]]] = {
    "QuantizeLinear": ({}, {1, 2}),
    "DequantizeLinear": ({0: 2}, {1, 2}),
    "MatMulInteger": ({0: 2, 1: 3}, {2, 3}),
    "ConvInteger": ({0: 2, 1: 3}, {2, 3}),
    "QLinearMatMul": ({0: 2, 3: 5}, {1, 2, 4, 5, 6, 7}),
    "QLinearConv": ({0: 2, 3: 5}, {1, 2, 4, 5, 6, 7}),
    # X, W, R, B, seq_lens, h0, c0, P, W_scale, W_zero_point, R_scale, R_zero_point
    "DynamicQuantizeLSTM": ({1: 9, 2: 11}, {8, 9, 10, 11}),
}


class OnnxSubject:
    """An ONNX file run by onnxruntime on CPU with ``threads`` intra-op threads."""

    runtime = "onnxruntime"
    dtype = torch.float32

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.proto, self.files = _load_onnx_proto(Path(path))
        # onnxruntime folds constants while it builds the session: a ConstantOfShape of a
        # trillion elements must be refused before that
        check_onnx_run(self.proto, None, 1, Path(path).name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # onnxruntime logs a failing node straight to stderr, in colour and with the file's
        # node names: the exception it raises is what torchslim reports, escaped
        opts.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's exceptions derive from Exception only
            raise TorchslimError(f"onnxruntime cannot run {path}: {_first_line(exc)}; "
                                 "re-export the model (opset 17 or newer)") from exc
        inputs = self.session.get_inputs()
        self.feeds = [(i.name, _ORT_DTYPES.get(i.type, np.float32)) for i in inputs]
        first = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = first if isinstance(first, int) else None
        self.static_spec = _static_spec(inputs)
        self.default_name = Path(path).name

    def timed(self, feed: dict):
        return self.session.run(None, feed)

    def prepare(self, xs: tuple) -> dict:
        if len(xs) != len(self.feeds):
            raise RuntimeError(f"the graph takes {len(self.feeds)} inputs "
                               f"({', '.join(n for n, _ in self.feeds)}), got {len(xs)}")
        return {n: x.numpy().astype(t) for (n, t), x in zip(self.feeds, xs, strict=True)}

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        try:
            return torch.from_numpy(self.timed(self.prepare(xs))[0])
        except Exception as exc:  # InvalidArgument/Fail: make them look like torch's errors
            raise RuntimeError(_first_line(exc)) from exc

    def precision(self) -> str:
        """int8 when the graph quantizes (QDQ pairs or integer kernels), else its float type."""
        from onnx import TensorProto

        from .onnx_quant import INT8_OPS, QDQ_OPS

        graph = self.proto.graph
        if {n.op_type for n in graph.node} & (INT8_OPS | QDQ_OPS):
            return "int8"
        types = {t.data_type for t in graph.initializer}
        if any(t == np.float16 for _, t in self.feeds) or TensorProto.FLOAT16 in types:
            return "fp16"
        return "bf16" if TensorProto.BFLOAT16 in types else "fp32"

    def _weights(self) -> list[tuple[np.ndarray, np.ndarray | int]]:
        """(array, zero point) of each initializer that is a model parameter."""
        from onnx import numpy_helper

        graph = self.proto.graph
        zero_point_of: dict[str, str | None] = {}
        quant_meta: set[str] = set()
        for node in graph.node:
            data_to_zp, meta = _QUANT_INPUTS.get(node.op_type, ({}, set()))
            for i, name in enumerate(node.input):
                if i in meta:
                    quant_meta.add(name)
                elif i in data_to_zp:
                    zp = data_to_zp[i]
                    zero_point_of[name] = node.input[zp] if zp < len(node.input) else None
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        weights = []
        for name, arr in inits.items():
            if name in quant_meta:
                continue
            if name in zero_point_of:  # quantized weight: zero is its zero point
                zp = inits.get(zero_point_of[name] or "")
                weights.append((arr, _broadcast_zero_point(arr, zp)))
            elif arr.dtype.kind == "f" and arr.ndim > 0:
                weights.append((arr, 0))  # int64 shapes and 0-d scales are constants
        return weights

    def count_params(self) -> tuple[int, int]:
        weights = self._weights()
        total = sum(int(a.size) for a, _ in weights)
        nonzero = sum(int(np.count_nonzero(a != zp)) for a, zp in weights)
        return total, nonzero

    def state_dict_bytes(self) -> int:
        state = {str(i): torch.from_numpy(a.astype(np.float32))
                 for i, (a, _) in enumerate(self._weights())}
        return state_dict_bytes(state)

    def macs(self, example: tuple, notes: list[str] | None = None) -> int | None:
        """Counted from the graph's shapes (onnx_macs.py); the MACs a file states about
        itself are shown only when the graph cannot be counted, and said to be stated."""
        from .onnx_macs import graph_macs

        notes = notes if notes is not None else []
        props = {p.key: p.value for p in self.proto.metadata_props}
        value = props.get(MACS_METADATA_KEY)
        stated = int(value) if value and value.isdigit() else None
        counted, why = graph_macs(self.proto, [tuple(x.shape) for x in example])
        if counted is None:
            if stated is not None:
                notes.append(f"MACs {stated:,} stated by the file, not measured ({why})")
            return stated
        if stated is not None and stated != counted:
            notes.append(f"the file states {stated:,} MACs; torchslim counts {counted:,} "
                         "(shown)")
        return counted


def _static_spec(inputs) -> InputSpec | None:
    """The graph's inputs as an InputSpec when every dimension but the batch is fixed."""
    specs = []
    for i in inputs:
        dims = i.shape or []
        if len(dims) < 1 or not all(isinstance(d, int) for d in dims[1:]):
            return None
        dtype = np.dtype(_ORT_DTYPES.get(i.type, np.float32)).name
        specs.append(TensorSpec((1, *dims[1:]), "bool" if dtype == "bool" else dtype))
    return InputSpec(tuple(specs)) if specs else None


def _load_onnx_proto(path: Path):
    """The graph with its weights, and every file it is made of: torch's dynamo exporter
    writes the weights beside the graph (``model.onnx.data``), and both are the model's size.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from .filecheck import check_onnx

    proto = onnx.load(str(path), load_external_data=False)
    check_onnx(proto, path.parent)  # no data outside its folder, none it does not hold
    external = {path.parent / e.value for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
    load_external_data_for_model(proto, str(path.parent))
    return proto, [path, *sorted(external)]


def _broadcast_zero_point(arr: np.ndarray, zp: np.ndarray | None) -> np.ndarray | int:
    """A per-channel zero point lies along one axis of the weight (axis 0 for conv weights)."""
    if zp is None:
        return 0
    if zp.size == 1 or np.all(zp == zp.flat[0]):  # symmetric int8: all zero
        return zp.flat[0].astype(arr.dtype)
    axis = next((i for i, n in enumerate(arr.shape) if n == zp.size), 0)
    shape = [1] * arr.ndim
    shape[axis] = zp.size
    return zp.reshape(shape)
