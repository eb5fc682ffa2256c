"""Declared sizes against the bytes a file holds, for the formats that are not pickles:
ONNX tensors (inline and external data, kept inside the model's folder) and .npz arrays
(headers against records, and no deflate bomb)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO

from .pickle_scan import AlteredFile, UnreadableFile

NPZ_EXPANSION = 64  # savez_compressed of real images shrinks 2-10x; zeros shrink 1000x

def _onnx_tensors(graph):
    """Every TensorProto in a graph and its subgraphs (initializers, node attributes)."""
    todo = [graph]
    while todo:
        g = todo.pop()
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from (sp.values, sp.indices)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    todo.append(a.g)
                todo.extend(a.graphs)


def _onnx_nbytes(t) -> int | None:
    """Bytes the tensor's dims and type declare; None for strings (variable length)."""
    from onnx import TensorProto, helper

    numel = 1
    for d in t.dims:
        if d < 0:
            raise AlteredFile(f"tensor {t.name!r} has a negative dimension")
        numel *= d
    if t.data_type == TensorProto.STRING:
        return None
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1",
                                                                    -1)):
        return (numel + 1) // 2
    try:
        return numel * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError) as exc:  # UNDEFINED (0) or a number onnx lacks
        raise AlteredFile(f"tensor {t.name!r} has unknown data type {t.data_type}") from exc


def _onnx_external(t, folder: Path, expected: int | None) -> None:
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    target = (folder / loc).resolve()
    if not loc or Path(loc).is_absolute() or not target.is_relative_to(folder.resolve()):
        raise AlteredFile(f"tensor {t.name!r} keeps its data outside the model's folder "
                          f"({loc!r})")
    if not target.is_file():
        raise AlteredFile(f"tensor {t.name!r} keeps its data in {loc}, which does not exist")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else target.stat().st_size - offset
    except ValueError as exc:
        raise AlteredFile(f"tensor {t.name!r} has a malformed offset or length") from exc
    if offset < 0 or length < 0 or offset + length > target.stat().st_size or (
            expected is not None and length != expected):
        raise AlteredFile(f"tensor {t.name!r} declares {expected} bytes at {offset} of {loc}, "
                          "which does not hold them")


def check_onnx(proto, folder: Path) -> None:
    """Refuse an ONNX model whose tensors declare more data than they hold, or keep it
    outside ``folder`` (the model file's own folder). Reads no external data."""
    from onnx import TensorProto

    for t in _onnx_tensors(proto.graph):
        expected = _onnx_nbytes(t)
        if t.data_location == TensorProto.EXTERNAL:
            _onnx_external(t, folder, expected)
        elif expected is not None and t.HasField("raw_data"):
            if len(t.raw_data) != expected:
                raise AlteredFile(f"tensor {t.name!r} declares {expected} bytes and holds "
                                  f"{len(t.raw_data)}")
        elif expected and not _typed_count(t):
            raise AlteredFile(f"tensor {t.name!r} declares {expected} bytes and holds none")


def _typed_count(t) -> int:
    return (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
            + len(t.uint64_data))


def check_npz(f: IO[bytes], size: int) -> None:
    """Every array of an .npz holds the bytes its header declares, and decompressing the
    archive cannot need more than ``NPZ_EXPANSION`` x the file (a deflate bomb)."""
    import numpy as np

    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except Exception as exc:  # zipfile raises many types on crafted directories
        raise UnreadableFile(f"its zip directory is unreadable ({type(exc).__name__})") from exc
    if sum(i.file_size for i in infos) > NPZ_EXPANSION * size + (16 << 20):
        raise AlteredFile("its arrays would decompress to far more than the file's size")
    for i in infos:
        try:
            with zf.open(i) as member:
                fmt = np.lib.format
                read = (fmt.read_array_header_1_0 if fmt.read_magic(member) == (1, 0)
                        else fmt.read_array_header_2_0)
                shape, _, dtype = read(member)
                header = member.tell()
        except Exception as exc:  # a bad header: numpy raises ValueError and friends
            raise AlteredFile(f"array {i.filename} has a malformed header") from exc
        if dtype.hasobject or header + math.prod(shape) * dtype.itemsize != i.file_size:
            raise AlteredFile(f"array {i.filename} declares shape {shape} of {dtype}, which "
                              "its record does not hold")
