"""Hostile .pt, .npz and ONNX files are refused before anything runs, fast and in bounded
memory; files torch.save writes for tensors, state dicts and modules still load."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.compress import filecheck, pickle_scan
from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import load_model
from torchslim.compress.safeload import AlteredFile, NeedsTrust, load_checked, pickle_globals

FIXTURES = Path(__file__).parent / "fixtures"


class Call:
    """Pickles as REDUCE ``fn(*args)``: what a crafted file can ask the unpickler to run."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class Storage:
    """A persistent id naming ``data/KEY``, with the element count the file declares."""

    def __init__(self, key: str, numel: int, cls=torch.FloatStorage):
        self.pid = ("storage", cls, key, "cpu", numel)


def tensor(storage: Storage, size, stride, offset=0, hooks=None):
    return Call(torch._utils._rebuild_tensor_v2, storage, offset, tuple(size), tuple(stride),
                False, hooks if hooks is not None else OrderedDict())


PLACEHOLDER = "@@SPLICE@@"


def write_zip(path: Path, obj, records: dict[str, bytes] | None = None,
              compress: bool = False, splice: bytes = b"") -> Path:
    """A torch-format zip (what torch.save writes) holding ``obj``'s protocol-2 pickle, with
    the string PLACEHOLDER replaced by the raw opcodes ``splice``."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = lambda o: o.pid if isinstance(o, Storage) else None
    p.dump(obj)
    if splice:
        text = PLACEHOLDER.encode()
        old = b"X" + len(text).to_bytes(4, "little") + text
        buf = io.BytesIO(buf.getvalue().replace(old, splice))
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def torchslim_file(model) -> dict:
    return {"format": "torchslim", "model": model, "meta": {}}


def test_crafted_valid_file_loads(tmp_path):
    # the crafting helper writes files torch really reads, so refusals below are the check's
    data = torch.arange(6, dtype=torch.float32)
    path = write_zip(tmp_path / "ok.pt", {"w": tensor(Storage("0", 6), (2, 3), (3, 1))},
                     {"0": data.numpy().tobytes()})
    assert torch.equal(load_checked(path)["w"], data.view(2, 3))


def _bombs(tmp_path: Path) -> dict[str, Path]:
    lin = nn.Linear(2, 2)
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(nn.ReLU())  # a hook that is an allow-listed module
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    dag: list = []
    for _ in range(40):
        dag = [dag, dag]
    cyc: list = []
    cyc.append(cyc)
    lstm = nn.LSTM(2, 2)
    lstm.num_layers, lstm._all_weights = 10**9, [[0]]  # __setstate__ would loop 10^9 times
    shadow = nn.Linear(2, 2)
    shadow.__dict__["forward"] = nn.Linear(2, 2)
    four = {"0": np.zeros(4, np.float32).tobytes()}
    files = {  # name: (object, records for write_zip; None: written by torch.save)
        "reduce Linear(30000, 30000)": (torchslim_file(Call(nn.Linear, 30000, 30000)), None),
        "reduce FloatTensor(30000, 30000)": (
            torchslim_file(Call(torch.FloatTensor, 30000, 30000)), None),
        "newobj Tensor(30000, 30000)": (torchslim_file(PLACEHOLDER), {}, _newobj("torch\nTensor")),
        "newobj Linear with arguments": (
            torchslim_file(PLACEHOLDER), {}, _newobj("torch.nn.modules.linear\nLinear")),
        "rebuild_from_type_v2(Linear)": (torchslim_file(
            Call(torch._tensor._rebuild_from_type_v2, nn.Linear, torch.Tensor, (30000, 30000),
                 {})), None),
        "storage declares 10^9 floats": (
            {"w": tensor(Storage("0", 10**9), (10**9,), (1,))}, four),
        "stride-0 view of 1 float": (
            {"w": tensor(Storage("0", 1), (10**5, 10**5), (0, 0))}, {"0": b"\0" * 4}),
        "view past its storage": ({"w": tensor(Storage("0", 4), (4,), (1,), offset=3)}, four),
        "tensor backward hooks": ({"w": tensor(Storage("0", 4), (4,), (1,),
                                               hooks=OrderedDict(a=nn.Linear))}, four),
        "forward hook": (torchslim_file(hooked), None),
        "state shadows forward": (torchslim_file(shadow), None),
        "lstm num_layers 10^9": (torchslim_file(lstm), None),
        "deep nesting": (torchslim_file(nn.Identity()) | {"meta": {"x": deep}}, None),
        "memo DAG 2^40": (torchslim_file(nn.Identity()) | {"meta": {"x": dag}}, None),
        "reference cycle": (torchslim_file(nn.Identity()) | {"meta": {"x": cyc}}, None),
        "submodule that is a tensor": (torchslim_file(_with_modules(lin, torch.zeros(2))), None),
        "class object as a value": (torchslim_file(nn.Identity()) | {"meta": {"x": nn.Linear}},
                                    None),
        "deflate-compressed record": ({"w": tensor(Storage("0", 4), (4,), (1,))}, four),
    }
    out = {}
    for i, (name, (obj, records, *splice)) in enumerate(files.items()):
        path = tmp_path / f"b{i}.pt"
        if records is None:
            _deep_save(obj, path)
        else:
            write_zip(path, obj, records, compress=name.startswith("deflate"),
                      splice=splice[0] if splice else b"")
        out[name] = path
    return out


def _newobj(glob: str) -> bytes:
    """Opcodes for ``cls.__new__(cls, 30000, 30000)``: GLOBAL, BININT2 x2, TUPLE2, NEWOBJ."""
    n = (30000).to_bytes(2, "little")
    return b"c" + glob.encode() + b"\n" + b"M" + n + b"M" + n + b"\x86\x81"


def _deep_save(obj, path: Path) -> None:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 30000))  # the deep-nesting file nests 5000 lists
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)


def _with_modules(module: nn.Module, thing) -> nn.Module:
    module._modules["evil"] = thing
    return module


REASONS = {
    "reduce Linear(30000, 30000)": "calls torch.nn.modules.linear.Linear",
    "reduce FloatTensor(30000, 30000)": "calls torch.FloatTensor",
    "newobj Tensor(30000, 30000)": "creates torch.Tensor with constructor arguments",
    "newobj Linear with arguments": "creates torch.nn.modules.linear.Linear with constructor",
    "rebuild_from_type_v2(Linear)": "calls torch._tensor._rebuild_from_type_v2",
    "storage declares 10^9 floats": "declares 1000000000 x torch.float32 but the file holds 16",
    "stride-0 view of 1 float": "views 10000000000 elements",
    "view past its storage": "up to index 6 of storage 0, which holds 4",
    "tensor backward hooks": "unusual arguments (hooks or metadata)",
    "forward hook": "carries _forward_hooks",
    "state shadows forward": "replaces its method or property 'forward'",
    "lstm num_layers 10^9": "stores no weight names",
    "deep nesting": "nest 201 deep",
    "memo DAG 2^40": "unroll to 2000001 nodes",
    "reference cycle": "reference cycle",
    "submodule that is a tensor": "submodules, parameters or buffers are not what torch",
    "class object as a value": "holds torch.nn.modules.linear.Linear as a value",
    "deflate-compressed record": "is compressed",
}


def test_bombs_are_refused_before_unpickling(tmp_path):
    bombs = _bombs(tmp_path)
    assert set(bombs) == set(REASONS)
    for name, path in bombs.items():
        with pytest.raises(AlteredFile) as info:
            load_checked(path, [nn.Linear, nn.Identity, nn.ReLU, nn.LSTM])
        assert REASONS[name] in str(info.value), name


def test_bomb_through_load_model_is_one_line(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save(torchslim_file(Call(nn.Linear, 30000, 30000)), path)
    with pytest.raises(TorchslimError) as info:
        load_model(path)
    msg = str(info.value)
    assert 1000 < path.stat().st_size < 1500  # the 1.3 KB file
    assert "is not a file torchslim wrote, or it was altered; load it with --trust only if " \
           "you trust its source" in msg
    assert "torch.nn.modules.linear.Linear" in msg and "\n" not in msg


def test_foreign_classes_need_trust_and_are_named(tmp_path):
    path = tmp_path / "user.pt"
    torch.save(torchslim_file(_UserNet()), path)
    with pytest.raises(NeedsTrust) as info:
        load_checked(path, [nn.Linear])
    assert info.value.names == [f"{__name__}._UserNet"]
    assert f"{__name__}._UserNet" in pickle_globals(path)
    with pytest.raises(TorchslimError, match="pass --trust"):
        load_model(path)


class _UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


BOMB_PROBE = """
import resource, sys, time
from pathlib import Path
from torchslim.compress.io import load_model
from torchslim.compress.errors import TorchslimError
load_model(sys.argv[1])  # a normal load first: imports, allocator and caches warm
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worst = 0.0
for p in sys.argv[2:]:
    t = time.perf_counter()
    try:
        load_model(p)
        print("LOADED", p)
    except TorchslimError:
        pass
    worst = max(worst, time.perf_counter() - t)
grow = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(f"{worst:.4f} {grow:.1f}")
"""


def test_bombs_cost_milliseconds_and_no_memory(tmp_path):
    """Measured in a fresh process: the high-water mark of its memory after a normal load
    must not rise while every bomb is refused (the issue's Linear(30000, 30000) bomb alone
    allocated 3.6 GB before this check)."""
    bombs = [str(p) for p in _bombs(tmp_path).values()]
    out = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(FIXTURES / "trained.pt"),
                          *bombs], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED" not in out.stdout
    worst, grow = (float(v) for v in out.stdout.split()[-2:])
    assert worst < 1.0  # seconds for the slowest refusal (typically a few ms)
    assert grow < 8.0  # MB


def test_state_dict_and_module_pickles_still_load(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.LSTM(4, 4))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(model, tmp_path / "m.pt")
    sd = load_checked(tmp_path / "sd.pt")
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert sd._metadata == model.state_dict()._metadata
    loaded = load_checked(tmp_path / "m.pt", [nn.Sequential, nn.Conv2d, nn.BatchNorm2d,
                                              nn.LSTM])
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_tied_weights_and_views_load(tmp_path):
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # one Parameter in two modules
    buf = torch.arange(16.0)
    torch.save({"m": nn.Sequential(a, b), "v": [buf, buf[4:8], buf.view(4, 4)]},
               tmp_path / "t.pt")
    got = load_checked(tmp_path / "t.pt", [nn.Sequential, nn.Linear])
    assert got["m"][0].weight is got["m"][1].weight
    assert got["v"][1].data_ptr() == got["v"][0].data_ptr() + 16


def test_npz_deflate_bomb_and_lying_header(tmp_path):
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((30000, 1, 16, 16), np.float32),
                        y=np.zeros(30000, np.int64))  # 31 MB of zeros in ~30 KB
    with open(bomb, "rb") as f, pytest.raises(AlteredFile, match="decompress"):
        filecheck.check_npz(f, bomb.stat().st_size)
    liar = tmp_path / "liar.npz"
    header = np.lib.format.header_data_from_array_1_0(np.zeros((10**6, 8), np.float32))
    raw = io.BytesIO()
    np.lib.format.write_array_header_1_0(raw, header)
    with zipfile.ZipFile(liar, "w") as zf:
        zf.writestr("x.npy", raw.getvalue() + b"\0" * 64)
    with open(liar, "rb") as f, pytest.raises(AlteredFile, match="does not hold"):
        filecheck.check_npz(f, liar.stat().st_size)
    from torchslim.compress.data import load_data

    with pytest.raises(TorchslimError, match="does not hold"):
        load_data(str(liar))


def _onnx_with(tmp_path: Path, tensor_proto) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["x", tensor_proto.name], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4])], [tensor_proto])
    path = tmp_path / "sub" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))
    return path


def _external(name: str, location: str, length: int, dims=(4,)):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


@pytest.mark.parametrize("location, length, dims, message", [
    ("../secret.bin", 16, (4,), "outside the model's folder"),
    ("/etc/passwd", 16, (4,), "outside the model's folder"),
    ("w.bin", 16, (10**9,), "does not hold"),
    ("w.bin", 4 * 10**9, (10**9,), "does not hold"),
    ("missing.bin", 16, (4,), "does not exist"),
])
def test_onnx_external_data_is_confined_and_sized(tmp_path, location, length, dims, message):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _onnx_with(tmp_path, _external("w", location, length, dims))
    (path.parent / "w.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TorchslimError, match=message):
        load_model(path)


def test_onnx_inline_tensor_declaring_more_than_it_holds(tmp_path):
    from onnx import TensorProto

    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**8], raw_data=b"\0" * 16)
    with pytest.raises(TorchslimError, match="declares 400000000 bytes and holds 16"):
        load_model(_onnx_with(tmp_path, t))


def test_onnx_valid_external_data_loads(tmp_path):
    path = _onnx_with(tmp_path, _external("w", "w.bin", 16))
    (path.parent / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    assert load_model(path).kind == "onnx"
    from torchslim.compress.measure_onnx import _load_onnx_proto

    proto, files = _load_onnx_proto(path)
    assert files == [path, path.parent / "w.bin"]


def test_onnx_metadata_that_is_not_json(tmp_path):
    import onnx

    path = FIXTURES / "int8.onnx"
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "torchslim":
            p.value = "{not json"
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(TorchslimError, match="metadata is malformed"):
        load_model(bad)
    assert json.loads(next(p.value for p in onnx.load(str(path)).metadata_props
                           if p.key == "torchslim"))["input_shape"] == [1, 8, 8]


# --- hand-assembled pickles: orders of opcodes the Python pickler never emits -----------

def _str(s: str) -> bytes:
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _zip_raw(path: Path, pickle_bytes: bytes, records: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for key, data in records.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def test_tensor_hooks_filled_after_the_rebuild_are_refused(tmp_path):
    """torch keeps the very OrderedDict given to _rebuild_tensor_v2 as the tensor's
    backward hooks, so filling it later (BINGET + SETITEM) would install a hook."""
    storage = (b"((" + _str("storage") + _glob("torch", "FloatStorage") + _str("0")
               + _str("cpu") + b"K\x04tQ")
    hooks = _glob("collections", "OrderedDict") + b")Rq\x01"
    rebuild = (_glob("torch._utils", "_rebuild_tensor_v2") + storage + b"K\x00(K\x04t(K\x01t"
               + b"\x89" + hooks + b"tR")
    late = _str("x") + b"h\x01" + _str("h") + b"K\x01s"  # result["x"] = hooks after hooks["h"]=1
    pk = b"\x80\x02}" + _str("w") + rebuild + b"s" + late + b"s."
    path = _zip_raw(tmp_path / "late.pt", pk, {"0": b"\0" * 16})
    got = torch.load(path, weights_only=True)  # torch alone: the hook is installed
    assert dict(got["w"]._backward_hooks) == {"h": 1}
    with pytest.raises(AlteredFile, match="backward hooks are filled in after"):
        load_checked(path)


def test_module_hooks_filled_after_build_are_refused(tmp_path):
    """The module's _forward_hooks dict is memoised: a later SETITEM on it reaches the module."""
    path = tmp_path / "m.pt"
    torch.save({"m": nn.Identity()}, path)
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        body = zf.read(name)
    ops = list(pickletools.genops(body))
    at = next(i for i, (op, arg, _) in enumerate(ops) if arg == "_forward_hooks")
    memo = next(arg for op, arg, _ in ops[at + 2:] if op.name in ("BINPUT", "LONG_BINPUT"))
    late = _str("x") + b"h" + bytes([memo]) + _str("h") + b"K\x01ss."
    assert body.endswith(b"u.") or body.endswith(b"s.")
    bad = _zip_raw(tmp_path / "bad.pt", body[:-1] + late, {})
    with torch.serialization.safe_globals([nn.Identity]):
        assert "h" in torch.load(bad, weights_only=True)["m"]._forward_hooks  # real attack
    with pytest.raises(AlteredFile, match="carries _forward_hooks"):
        load_checked(bad, [nn.Identity])


def test_object_flood_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_scan, "MAX_OBJECTS", 10_000)
    path = _zip_raw(tmp_path / "flood.pt", b"\x80\x02" + b"}" * 10_001 + b".", {})
    with pytest.raises(AlteredFile, match="builds over 10000 objects"):
        load_checked(path)


def test_zip_that_torch_reads_differently_is_refused(tmp_path):
    """Two records of one name: zipfile and torch's miniz may pick different ones."""
    path = tmp_path / "dup.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        zf.writestr("archive/version", "3\n")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("archive/data.pkl", pickle.dumps({"a": 2}, protocol=2))
    with pytest.raises(AlteredFile, match="holds a name twice"):
        load_checked(path)


def test_fuzz_findings_stay_fixed(tmp_path):
    """Two files the long fuzz run found: a bit flip that makes zipfile.is_zipfile itself
    raise (an end record claiming several disks), and an ONNX tensor of data type 0."""
    with pytest.raises(TorchslimError, match="not a readable PyTorch file"):
        load_model(FIXTURES / "fuzz-multidisk.pt")
    from onnx import TensorProto

    t = TensorProto(name="w", data_type=0, dims=[4], raw_data=b"\0" * 16)
    with pytest.raises(TorchslimError, match="unknown data type 0"):
        load_model(_onnx_with(tmp_path, t))
