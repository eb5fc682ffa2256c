"""Bound the work a file can ask for, before doing it.

A few-KB file can state a conv padding of 100000, an upsample x30000, an input of
1x100000x100000 or an ONNX ``ConstantOfShape`` of a trillion elements: running it asks the
allocator for tens of GB to TB. Before a model runs on an input, its tensors' sizes are
worked out from shapes alone (torch: a pass on the ``meta`` device, which allocates
nothing; ONNX: shape inference with data propagation) and the run is refused when one
tensor would pass :func:`memory_limit`. Special files (FIFOs, devices) are refused as
models or data, since reading one can block forever or never end.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from pathlib import Path

import torch
from torch import nn

from .errors import TorchslimError, UsageError

MEMORY_ENV = "TORCHSLIM_MAX_MEMORY"
# Half the machine: the model's weights, the other activations of the pass and the Python
# process itself need the rest.
RAM_FRACTION = 0.5
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def physical_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        return 8 << 30


def memory_limit() -> int:
    """Bytes one tensor may take: ``TORCHSLIM_MAX_MEMORY`` (``8G``, ``512M``, bytes) or half
    the physical RAM."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return int(physical_ram() * RAM_FRACTION)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", raw.lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{MEMORY_ENV}={raw!r} is not a size; give bytes or e.g. 8G, 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gb(n: int | float) -> str:
    return f"{n / (1 << 30):,.1f} GB"


def _refuse(what: str, need: int, limit: int) -> TorchslimError:
    source = f"{MEMORY_ENV}" if os.environ.get(MEMORY_ENV, "").strip() else \
        "half this machine's memory"
    return TorchslimError(
        f"{what} would need {gb(need)} in one tensor, over the {gb(limit)} limit ({source}); "
        f"nothing was run: check the input shape and the file, or raise {MEMORY_ENV} if the "
        "machine really has the memory")


def require_regular(path: str | Path, what: str) -> None:
    """Refuse a FIFO, device or socket as ``what``: reading one can block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: the caller's own "not found" says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"
        raise TorchslimError(f"{what} {path} is {kind}, not a regular file; pass a file")


# --- inputs ---------------------------------------------------------------------------


def check_inputs(spec, batch: int) -> None:
    """The generated inputs themselves (a stated 1x100000x100000 is 40 GB)."""
    limit = memory_limit()
    for t in spec.tensors:
        numel = batch
        for d in t.sample_shape:
            numel *= int(d)
        need = numel * torch.empty((), dtype=t.torch_dtype).element_size()
        if need > limit:
            raise _refuse(f"an input of shape {batch}x{'x'.join(map(str, t.sample_shape))}",
                          need, limit)


# --- torch ----------------------------------------------------------------------------


def largest_torch_tensor(model: nn.Module, example: tuple) -> tuple[int, str]:
    """(bytes, op) of the largest tensor one op makes in ``model(*example)``, from a pass on
    the ``meta`` device (shapes only, nothing allocated) of a copy whose weights are meta
    tensors; (0, "") when it cannot be worked out (data-dependent shapes, ops without meta
    kernels, TorchScript): the real run's own errors then apply."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        peak, where = 0, ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    n = t.numel() * t.element_size()
                    if n > self.peak:
                        self.peak, self.where = n, str(func.overloadpacket.__name__)
            return out

    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return 0, ""
    rec = Largest()
    try:
        # the copy shares nothing with the model: what forward caches or updates (cast
        # weights, running statistics) stays in the copy, and its weights cost no memory
        memo = {id(t): _meta_like(t) for t in (*model.parameters(), *model.buffers())}
        meta_model = copy.deepcopy(model, memo)
        fake = tuple(torch.empty_like(x, device="meta") for x in example)
        with torch.no_grad(), rec:
            meta_model(*fake)
    except Exception:  # noqa: BLE001  an op meta tensors cannot run: no estimate, not an error
        return rec.peak, rec.where
    return rec.peak, rec.where


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta


def check_torch(model, example: tuple, batch: int, name: str) -> None:
    """Refuse when one op of ``model`` at ``batch`` would make a tensor over the limit."""
    peak, op = largest_torch_tensor(model, example)
    need = peak * max(1, batch) // max(1, int(example[0].shape[0]) if example else 1)
    limit = memory_limit()
    if need > limit:
        raise _refuse(f"running {name} at batch {batch} ({op})", need, limit)


# --- modules whose attributes contradict their weights ----------------------------------


def check_attributes(model: nn.Module, path) -> None:
    """A Linear/Conv/Embedding/norm whose attributes disagree with its weights: lowrank,
    swap and pruning size new layers from the attributes, so a file could make them
    allocate anything. torch never writes such a module."""
    for name, m in model.named_modules():
        bad = _disagreement(m)
        if bad:
            raise TorchslimError(f"{path} is not a file torchslim wrote, or it was altered: "
                                 f"layer {name or '(root)'} ({type(m).__name__}) {bad}; "
                                 "re-save the model")


def _shape(t) -> tuple | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _disagreement(m: nn.Module) -> str | None:  # noqa: C901  one case per layer family
    w = _shape(getattr(m, "weight", None)) if isinstance(
        m, nn.Linear | nn.modules.conv._ConvNd | nn.Embedding | nn.LayerNorm
        | nn.modules.batchnorm._NormBase) else None
    b = _shape(getattr(m, "bias", None))
    if isinstance(m, nn.Linear):
        if w != (m.out_features, m.in_features) or b not in (None, (m.out_features,)):
            return f"states {m.in_features}->{m.out_features} but holds weight {w}, bias {b}"
    elif isinstance(m, nn.modules.conv._ConvNd):
        ks = tuple(m.kernel_size)
        if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
            return f"states groups={m.groups} for {m.in_channels}->{m.out_channels} channels"
        want = (m.in_channels, m.out_channels // m.groups, *ks) if m.transposed else \
            (m.out_channels, m.in_channels // m.groups, *ks)
        if w != want or b not in (None, (m.out_channels,)):
            return f"states weight {want} but holds weight {w}, bias {b}"
    elif isinstance(m, nn.Embedding):
        if w != (m.num_embeddings, m.embedding_dim):
            return f"states {m.num_embeddings}x{m.embedding_dim} but holds weight {w}"
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        for t in (w, b, _shape(m.running_mean), _shape(m.running_var)):
            if t is not None and t != (m.num_features,):
                return f"states {m.num_features} features but holds a tensor of {t}"
    elif isinstance(m, nn.LayerNorm):
        if w is not None and w != tuple(m.normalized_shape):
            return f"states shape {tuple(m.normalized_shape)} but holds weight {w}"
    return None


# --- ONNX -----------------------------------------------------------------------------

_CONTROL_FLOW = ("Loop", "Scan", "If")
MAX_LOOP_TRIPS = 100_000


def infer_shapes(proto, shapes):
    """``proto`` after ONNX shape inference with data propagation (so ConstantOfShape and
    Expand of constant shapes are sized), its graph inputs fixed to ``shapes`` (full shapes,
    batch first) where the ranks agree; None when inference cannot follow the graph."""
    import onnx
    from onnx import shape_inference

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    for vi, shape in zip(graph_inputs, shapes, strict=False):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for d, n in zip(dims, shape, strict=True):
                d.Clear()
                d.dim_value = int(n)
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001  a graph inference cannot follow: no estimate
        return None


def known_shapes(inferred) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, element type) of every tensor whose shape inference fixed fully."""
    g = inferred.graph
    out = {t.name: (tuple(t.dims), t.data_type) for t in g.initializer}
    for vi in [*g.value_info, *g.output, *g.input]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or tt.elem_type == 0:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                for d in tt.shape.dim]
        if None not in dims:
            out[vi.name] = (tuple(dims), tt.elem_type)
    return out


def largest_onnx_tensor(proto, spec, batch: int) -> tuple[int, str]:
    """(bytes, tensor name) of the largest tensor shape inference finds in ``proto`` with
    its inputs fixed to ``spec`` at ``batch``; (0, "") when unknown."""
    from onnx import helper

    shapes = [(batch, *t.sample_shape) for t in spec.tensors] if spec is not None else []
    inferred = infer_shapes(proto, shapes)
    if inferred is None:
        return 0, ""
    peak, where = 0, ""
    for name, (shape, elem) in known_shapes(inferred).items():
        numel = 1
        for d in shape:
            numel *= d
        size = numel * helper.tensor_dtype_to_np_dtype(elem).itemsize
        if size > peak:
            peak, where = size, name
    return peak, where


def check_onnx_run(proto, spec, batch: int, name: str) -> None:
    peak, where = largest_onnx_tensor(proto, spec, batch)
    limit = memory_limit()
    if peak > limit:
        raise _refuse(f"running {name} at batch {batch} (tensor {where!r})", peak, limit)


def check_onnx_loops(proto, path, trusted: bool) -> None:
    """A Loop whose trip count is not a constant can run forever (onnxruntime cannot be
    interrupted mid-run): refused unless trusted. Constant counts are capped."""
    consts = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    for node in _all_nodes(proto.graph):
        if node.op_type != "Loop":
            continue
        trips = _const_int(consts.get(node.input[0])) if node.input and node.input[0] else None
        if trips is None and not trusted:
            raise TorchslimError(
                f"{path} holds a Loop ({node.name or 'unnamed'}) whose trip count is not a "
                "constant, so running it may never end; pass --trust (or TORCHSLIM_TRUST=1) "
                "only if you trust the file's source")
        if trips is not None and trips > MAX_LOOP_TRIPS and not trusted:
            raise TorchslimError(
                f"{path} holds a Loop ({node.name or 'unnamed'}) of {trips} iterations, over "
                f"{MAX_LOOP_TRIPS}; pass --trust only if you trust the file's source")


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g is not None and a.g.node:
                yield from _all_nodes(a.g)
            for sub in a.graphs:
                yield from _all_nodes(sub)


def _const_int(t) -> int | None:
    if t is None:
        return None
    from onnx import numpy_helper

    try:
        arr = numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001  an external or malformed tensor: not a known constant
        return None
    return int(arr.reshape(-1)[0]) if arr.size == 1 and arr.dtype.kind in "iu" else None
