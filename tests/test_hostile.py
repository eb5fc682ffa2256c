"""Hostile files, second round (issue 21): no code without trust, no file-chosen behaviour,
no terminal injection, work bounded by the file, numbers a file cannot fake.

Every refusal is checked for its exit code, its one line, its speed and that the input
file is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from torch import nn
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress.io import load_model, trust_env

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.02"]
ERROR_LINE = re.compile(r"^error: [^\n]+\n$")


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refused(args, code: int, *needles: str, files=(), env=None, seconds: float = 30.0):
    """Run the CLI; assert exit ``code``, one error line holding ``needles``, no
    traceback, ``files`` unchanged, and a fast answer. Returns the output."""
    before = {f: digest(f) for f in files}
    start = time.perf_counter()
    res = runner.invoke(app, [str(a) for a in args], env=env)
    took = time.perf_counter() - start
    out = res.output
    assert res.exit_code == code, out
    assert ERROR_LINE.match(out), out  # exactly one line
    assert "Traceback" not in out and "\x1b" not in out
    for n in needles:
        assert n in out, out
    assert {f: digest(f) for f in files} == before
    assert took < seconds, f"{took:.1f}s"
    return out


def save_torchslim(model: nn.Module, path: Path, shape, raw_state: bool = False) -> Path:
    """A torchslim-format file as torch.save writes it; ``raw_state`` pickles each module's
    whole __dict__ (torch drops ``_compiled_call_impl``), as a crafted file can."""
    payload = {"format": "torchslim", "model": model.eval(),
               "meta": {"input_shape": list(shape)}}
    if not raw_state:
        torch.save(payload, path)
        return path
    orig = nn.Module.__getstate__
    nn.Module.__getstate__ = lambda self: dict(self.__dict__)
    try:
        torch.save(payload, path)
    finally:
        nn.Module.__getstate__ = orig
    return path


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))


# --- 1. trust only from explicit values ---------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_trust_env_yes(monkeypatch, value):
    monkeypatch.setenv("TORCHSLIM_TRUST", value)
    assert trust_env() is True


@pytest.mark.parametrize("value", ["", "0", "false", "False", "NO", "off", "OFF"])
def test_trust_env_no(monkeypatch, value):
    monkeypatch.setenv("TORCHSLIM_TRUST", value)
    assert trust_env() is False


class Planted:
    """A pickle whose unpickling writes a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("value", ["off", "False", "maybe", "2", "enabled", "y"])
def test_trust_env_no_or_unclear_runs_nothing(tmp_path, value):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Planted(str(marker))}, evil)
    if value in ("off", "False"):  # explicit no: refused as needing trust, exit 1
        out = refused(["report", evil, *FAST], 1, "--trust", files=[evil],
                      env={"TORCHSLIM_TRUST": value})
    else:
        out = refused(["report", evil, *FAST], 2, "TORCHSLIM_TRUST", repr(value),
                      files=[evil], env={"TORCHSLIM_TRUST": value})
    assert not marker.exists(), out


def test_unclear_trust_env_refused_even_with_trust_flag(tmp_path):
    path = save_torchslim(mlp(), tmp_path / "m.pt", (8,))
    refused(["report", path, "--trust", *FAST], 2, "TORCHSLIM_TRUST", files=[path],
            env={"TORCHSLIM_TRUST": "sure"})


# --- 2. a safe load yields modules whose calls run their class's code ---------------


def test_compiled_call_impl_planted_is_refused(tmp_path):
    model = mlp()
    model.__dict__["_compiled_call_impl"] = nn.Identity()  # would run instead of forward
    path = save_torchslim(model, tmp_path / "redirect.pt", (8,), raw_state=True)
    refused(["report", path, *FAST], 1, "_compiled_call_impl", "--trust", files=[path])


@pytest.mark.parametrize("key", ["forward", "_call_impl", "__call__", "_wrapped_call_impl"])
def test_call_path_attributes_are_refused(tmp_path, key):
    model = mlp()
    model.__dict__[key] = nn.Identity()
    path = save_torchslim(model, tmp_path / f"{key}.pt", (8,), raw_state=True)
    refused(["report", path, *FAST], 1, key, files=[path])


def test_module_hidden_outside_modules_is_refused(tmp_path):
    model = mlp()
    model.__dict__["helpers"] = [nn.Identity()]  # a module reachable outside _modules
    path = save_torchslim(model, tmp_path / "hidden.pt", (8,), raw_state=True)
    refused(["report", path, *FAST], 1, "'helpers'", "outside _modules", files=[path])


def test_filled_hooks_are_refused(tmp_path):
    model = mlp()
    model._forward_hooks[0] = nn.Identity()  # a module as a hook: called on every forward
    path = save_torchslim(model, tmp_path / "hook.pt", (8,))
    refused(["report", path, *FAST], 1, "_forward_hooks", files=[path])


def test_clean_model_still_measures_its_own_macs(tmp_path):
    path = save_torchslim(mlp(), tmp_path / "clean.pt", (8,))
    loaded = load_model(path)
    assert loaded.model(torch.randn(2, 8)).shape == (2, 4)
    res = runner.invoke(app, ["report", str(path), "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    assert '"macs": 768' in res.output  # 8*64 + 64*4


# --- 4. work bounded by the file ----------------------------------------------------


@pytest.mark.parametrize("name, model, shape, needle", [
    ("pad", nn.Sequential(nn.Conv2d(1, 2, 3, padding=100000), nn.Flatten()), (1, 8, 8),
     "convolution"),
    ("upsample", nn.Sequential(nn.Upsample(scale_factor=30000), nn.Flatten()), (1, 8, 8),
     "upsample"),
    ("pool", nn.Sequential(nn.AdaptiveAvgPool2d((100000, 100000)), nn.Flatten()), (1, 8, 8),
     "adaptive_avg_pool"),
    ("input", nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), (1, 100000, 100000),
     "an input of shape 32x1x100000x100000"),
])
def test_huge_activations_refused_from_shapes(tmp_path, name, model, shape, needle):
    path = save_torchslim(model, tmp_path / f"{name}.pt", shape)
    refused(["report", path, *FAST], 1, needle, "GB in one tensor", "TORCHSLIM_MAX_MEMORY",
            files=[path])


def test_memory_limit_override(tmp_path, monkeypatch):
    path = save_torchslim(mlp(), tmp_path / "m.pt", (8,))
    # 8 x 64 floats at batch 32 is 64 KB: a 10 KB limit refuses it, naming the variable
    out = refused(["report", path, *FAST], 1, "(TORCHSLIM_MAX_MEMORY)", files=[path],
                  env={"TORCHSLIM_MAX_MEMORY": "10K"})
    assert "0.0 GB" in out
    refused(["report", path, *FAST], 2, "TORCHSLIM_MAX_MEMORY", files=[path],
            env={"TORCHSLIM_MAX_MEMORY": "lots"})


@pytest.mark.parametrize("layer, needle", [
    ("linear", "states 100000->100000 but holds weight (4, 8)"),
    ("conv", "states weight (100000, 1, 3, 3) but holds weight (2, 1, 3, 3)"),
    ("embedding", "states 100000x100000 but holds weight (10, 4)"),
])
def test_attributes_that_contradict_weights_are_refused(tmp_path, layer, needle):
    if layer == "linear":
        m = nn.Linear(8, 4)
        m.in_features = m.out_features = 100000
        model, shape = nn.Sequential(m), (8,)
    elif layer == "conv":
        m = nn.Conv2d(1, 2, 3)
        m.out_channels = 100000
        model, shape = nn.Sequential(m, nn.Flatten()), (1, 8, 8)
    else:
        m = nn.Embedding(10, 4)
        m.num_embeddings = m.embedding_dim = 100000
        model, shape = nn.Sequential(m), (3,)
    path = save_torchslim(model, tmp_path / f"{layer}.pt", shape)
    for cmd in (["report", path, *FAST], ["swap", path, "-o", tmp_path / "out.pt"]):
        refused(cmd, 1, needle, files=[path])
    assert not (tmp_path / "out.pt").exists()


def onnx_file(path: Path, nodes, inits, inp=("x", [1, 4])) -> Path:
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(inp[0], T.FLOAT, inp[1])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def i64(name, values):
    return nh.from_array(np.array(values, np.int64), name)


def test_onnx_constant_of_shape_huge(tmp_path):
    path = onnx_file(tmp_path / "cos.onnx", [
        h.make_node("ConstantOfShape", ["s"], ["c"],
                    value=nh.from_array(np.array([1.0], np.float32))),
        h.make_node("ReduceSum", ["c"], ["r"], keepdims=0),
        h.make_node("Add", ["x", "r"], ["y"])], [i64("s", [100000, 100000])])
    refused(["report", path, *FAST], 1, "37.3 GB", "'c'", files=[path])


def test_onnx_expand_huge(tmp_path):
    path = onnx_file(tmp_path / "expand.onnx", [
        h.make_node("Expand", ["x", "s"], ["e"]),
        h.make_node("ReduceSum", ["e"], ["y"], keepdims=0)], [i64("s", [100000, 100000, 4])])
    refused(["report", path, *FAST], 1, "149.0 GB", "'e'", files=[path])


def test_onnx_static_input_huge(tmp_path):
    path = onnx_file(tmp_path / "static.onnx", [h.make_node("Identity", ["x"], ["y"])], [],
                     inp=("x", [1, 100000, 100000]))
    refused(["report", path, *FAST], 1, "37.3 GB", files=[path])


def loop_file(path: Path, trips) -> Path:
    body = h.make_graph(
        [h.make_node("Identity", ["c_in"], ["c_out"]), h.make_node("Identity", ["v"], ["v_out"])],
        "body", [h.make_tensor_value_info("i", T.INT64, []),
                 h.make_tensor_value_info("c_in", T.BOOL, []),
                 h.make_tensor_value_info("v", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("c_out", T.BOOL, []),
         h.make_tensor_value_info("v_out", T.FLOAT, [1, 4])])
    inits = [nh.from_array(np.array(True), "t")]
    if trips is not None:
        inits.append(i64("n", trips))
    return onnx_file(path, [h.make_node("Loop", ["n" if trips is not None else "", "t", "x"],
                                        ["y"], body=body, name="forever")], inits)


def test_onnx_endless_loop_refused_without_trust(tmp_path):
    path = loop_file(tmp_path / "loop.onnx", None)
    refused(["report", path, *FAST], 1, "Loop (forever)", "may never end", "--trust",
            files=[path])
    big = loop_file(tmp_path / "long.onnx", 10**12)
    refused(["report", big, *FAST], 1, "1000000000000 iterations", files=[big])


def test_onnx_bounded_loop_runs(tmp_path):
    path = loop_file(tmp_path / "ok.onnx", 3)
    res = runner.invoke(app, ["report", str(path), "-f", "json", *FAST])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("as_", ["model", "data"])
def test_fifo_refused_without_hanging(tmp_path, as_):
    fifo = tmp_path / ("pipe.pt" if as_ == "model" else "pipe.npz")
    os.mkfifo(fifo)
    model = save_torchslim(mlp(), tmp_path / "m.pt", (8,))
    args = ["report", fifo] if as_ == "model" else ["report", model, "--data", fifo]
    refused([*args, *FAST], 1, "is a FIFO (named pipe), not a regular file", seconds=20)


def test_device_refused_as_model():
    refused(["report", "/dev/zero", *FAST], 1, "is a device, not a regular file")


# --- 3. one rendering rule: file, path and environment strings are text -------------

HOSTILE = "a[/x]\x1b]0;pwned\x07\x1b[2J[bold]b\nc"  # markup, OSC title, clear screen, newline


def hostile_model(folder: Path) -> Path:
    from torchslim.compress.io import ModelMeta, history_entry, save_model

    sub = folder / "d["  # the path itself holds "[/x]" and ESC
    sub.mkdir()
    meta = ModelMeta(input_shape=(8,), class_names=[HOSTILE],
                     history=[history_entry(HOSTILE, {"ratio": HOSTILE}, {"params": 36},
                                            {"params": 36}, notes=[HOSTILE])])
    return save_model(nn.Sequential(nn.Linear(8, 4)), sub / "x]\x1b\x07name.pt", meta)


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_hostile_strings_print_as_text(tmp_path, fmt):
    path = hostile_model(tmp_path)
    before = digest(path)
    res = runner.invoke(app, ["report", str(path), "-f", fmt, *FAST])
    out = res.output
    assert res.exit_code == 0, out
    assert "\x1b" not in out and "\x07" not in out and "MarkupError" not in out
    if fmt == "json":
        rows = json.loads(res.stdout)
        assert rows[0]["model"] == str(path)  # json keeps the exact string, escaped
    else:
        assert "x]\\x1b\\x07name.pt" in out  # visible escapes, brackets kept as text
    if fmt in ("table", "markdown"):
        assert "a[/x]\\x1b]0;pwned\\x07\\x1b[2J[bold]b\\x0ac" in out  # the history row
    assert digest(path) == before


def test_hostile_path_in_error_line(tmp_path):
    missing = tmp_path / "no[/x]\x1b[2Jne\x07.pt"
    out = refused(["report", missing, *FAST], 1, "model file not found",
                  "no[/x]\\x1b[2Jne\\x07.pt")
    assert "[/x]" in out


def test_hostile_class_name_in_needs_trust_line(tmp_path):
    import types
    mod = types.ModuleType("evil_mod")
    cls = type("Net\x1b]0;t\x07[/x]", (nn.Linear,), {"__module__": "evil_mod"})
    mod.__dict__[cls.__name__] = cls
    import sys
    sys.modules["evil_mod"] = mod
    try:
        path = tmp_path / "cls.pt"
        torch.save(cls(2, 2), path, pickle_protocol=2)
    finally:
        del sys.modules["evil_mod"]
    refused(["report", path, *FAST], 1, "evil_mod.Net\\x1b]0;t\\x07[/x]", "--trust",
            files=[path])


def test_hostile_environment_value_in_error_line(tmp_path):
    path = save_torchslim(mlp(), tmp_path / "m.pt", (8,))
    refused(["report", path, *FAST], 2, "'\\x1b[2J[/x]'", files=[path],
            env={"TORCHSLIM_TRUST": "\x1b[2J[/x]"})


def test_onnx_node_names_print_as_text(tmp_path):
    path = onnx_file(tmp_path / "names.onnx", [
        h.make_node("Relu", ["x"], ["r"], name="relu[/x]\x1b[2J"),
        h.make_node("Identity", ["r"], ["y"], name="id\x07")], [])
    res = runner.invoke(app, ["report", str(path), "--layers", *FAST])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert "relu[/x]\\x1b[2J" in res.output


def test_safe_text_rule():
    from torchslim.cli.render import safe_markup, safe_text

    assert safe_text("a\x1bb\x07c\nd\u202e") == "a\\x1bb\\x07c\\x0ad\\u202e"
    assert safe_text("l1\nl2\tx", multiline=True) == "l1\nl2\tx"
    assert safe_markup("[/x]") == "\\[/x]"


# --- 5. numbers a file cannot fake ----------------------------------------------------


def _onnx_rows(out: str) -> list[dict]:
    return [r for r in json.loads(out) if r["runtime"] == "onnxruntime"]


def test_planted_cache_entry_is_rebuilt_with_a_note(tmp_path):
    cache = tmp_path / "cache"
    env = {"TORCHSLIM_CACHE_DIR": str(cache)}
    torch.manual_seed(0)
    small = save_torchslim(nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
                           tmp_path / "small.pt", (8,))  # 706 params
    big = save_torchslim(nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 2)),
                         tmp_path / "big.pt", (8,))  # 1,410 params
    args = ["-f", "json", "--runtime", "onnxruntime", *FAST]
    first = runner.invoke(app, ["report", str(big), *args], env=env)
    assert first.exit_code == 0, first.output
    assert _onnx_rows(first.stdout)[0]["params"] == 1410
    assert (cache / "onnx").stat().st_mode & 0o777 == 0o700
    entry = next((cache / "onnx").glob("big-*.onnx"))
    # plant the small model's export under the big model's key, record and all
    runner.invoke(app, ["report", str(small), *args], env=env)
    planted = next((cache / "onnx").glob("small-*.onnx"))
    entry.write_bytes(planted.read_bytes())
    res = runner.invoke(app, ["report", str(big), *args], env=env)
    assert res.exit_code == 0, res.output
    row = _onnx_rows(res.stdout)[0]
    assert row["params"] == 1410  # not 706: the planted entry was not measured
    assert any("changed after it was made: rebuilt" in n for n in row["notes"])
    # a forged record naming the planted file's hash is still refused: wrong source key
    rec = entry.with_name(entry.name + ".json")
    forged = json.loads(rec.read_text())
    entry.write_bytes(planted.read_bytes())
    forged["sha256"] = digest(entry)
    forged["source"] = "0" * 64
    rec.write_text(json.dumps(forged))
    res = runner.invoke(app, ["report", str(big), *args], env=env)
    row = _onnx_rows(res.stdout)[0]
    assert row["params"] == 1410
    assert any("made from another model: rebuilt" in n for n in row["notes"])


def test_cache_folder_writable_by_others_is_not_used(tmp_path):
    cache = tmp_path / "shared"
    (cache / "onnx").mkdir(parents=True)
    (cache / "onnx").chmod(0o777)
    path = save_torchslim(mlp(), tmp_path / "m.pt", (8,))
    res = runner.invoke(app, ["report", str(path), "-f", "json", "--runtime", "onnxruntime",
                              *FAST], env={"TORCHSLIM_CACHE_DIR": str(cache)})
    assert res.exit_code == 0, res.output
    row = _onnx_rows(res.stdout)[0]
    assert row["params"] == 836
    assert any("not private to this user" in n for n in row["notes"])
    assert not list((cache / "onnx").iterdir())


def _with_stated_macs(path: Path, macs: str) -> Path:
    m = onnx.load(str(path))
    m.metadata_props.add(key="torchslim.macs", value=macs)
    onnx.save(m, str(path))
    return path


def test_onnx_stated_macs_are_checked_against_the_graph(tmp_path):
    w = nh.from_array(np.ones((4, 3), np.float32), "w")
    path = _with_stated_macs(onnx_file(tmp_path / "claims.onnx", [
        h.make_node("MatMul", ["x", "w"], ["y"])], [w]), "999999")
    res = runner.invoke(app, ["report", str(path), "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[0]
    assert row["macs"] == 12  # 1x4 @ 4x3, counted; not the 999,999 the file states
    assert "the file states 999,999 MACs; torchslim counts 12 (shown)" in row["notes"]


def test_onnx_stated_macs_shown_as_stated_when_uncountable(tmp_path):
    ws = [nh.from_array(np.ones((1, 2, 4), np.float32), "W"),
          nh.from_array(np.ones((1, 2, 2), np.float32), "R")]
    path = _with_stated_macs(onnx_file(tmp_path / "rnn.onnx", [
        h.make_node("RNN", ["x3", "W", "R"], ["seq", "y"], hidden_size=2)],
        ws, inp=("x3", [1, 3, 4])), "777")
    res = runner.invoke(app, ["report", str(path), "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[0]
    assert row["macs"] == 777
    assert any("MACs 777 stated by the file, not measured" in n for n in row["notes"])


def test_fifo_inside_an_image_folder_is_skipped(tmp_path):
    from PIL import Image

    from torchslim.compress.data import load_data

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / "imgs" / cls / f"{i}.png")
    os.mkfifo(tmp_path / "imgs" / "a" / "pipe.png")  # Image.open on it would block
    start = time.perf_counter()
    split = load_data(str(tmp_path / "imgs"), val_fraction=0.2)
    assert len(split.train) + len(split.val) == 10
    assert time.perf_counter() - start < 20
