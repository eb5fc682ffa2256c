"""A missing or read-only output folder, or a full disk, ends in one clear line: nothing
half-written is left, and the input file is untouched.

Read-only and full disks are real tmpfs mounts where this machine allows mounting (root
with CAP_SYS_ADMIN, as here and in CI); elsewhere those tests skip and the injected-errno
tests below still cover the same code."""

from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import ModelMeta, atomic_write, load_model, save_model

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mount(where: Path, options: str) -> Path:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]})")
    return where


@pytest.fixture()
def full_disk(tmp_path):
    """A 16 KiB file system: room for the folder, not for a model."""
    where = _mount(tmp_path / "full", "size=16k")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)  # lazy: torch may hold a handle


@pytest.fixture()
def read_only(tmp_path):
    where = _mount(tmp_path / "ro", "ro,size=1m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture()
def model_in(tmp_path):
    src = tmp_path / "in" / "trained.pt"  # 41 KB: every output is bigger than the full disk
    src.parent.mkdir()
    shutil.copy(FIXTURES / "trained.pt", src)
    return src, _digest(src)


def _cli(args: list[str]):
    res = runner.invoke(app, args)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    return res.exit_code, lines


@pytest.mark.parametrize("cmd", [
    ["quantize", "{src}", "--mode", "fp16", "--no-compare", "-o", "{out}/q.pt"],
    ["prune", "{src}", "--ratio", "0.25", "-o", "{out}/p.pt"],
    ["compress", "{src}", "--prune", "0.25", "--min-time", "0.01", "-o", "{out}/c.pt"],
])
def test_full_disk_is_one_line_and_leaves_nothing(full_disk, model_in, cmd):
    src, digest = model_in
    code, errors = _cli([a.format(src=src, out=full_disk) for a in cmd])
    assert code == 1, errors
    assert len(errors) == 1 and "is full" in errors[0] and "nothing was written" in errors[0]
    assert list(full_disk.iterdir()) == []  # no partial output, no temp file or folder
    assert _digest(src) == digest


def test_full_disk_onnx_output(full_disk, model_in):
    src, digest = model_in
    code, errors = _cli(["quantize", str(src), "--mode", "dynamic", "--no-compare",
                         "-o", str(full_disk / "q.onnx")])
    assert code == 1 and len(errors) == 1 and "is full" in errors[0], errors
    assert list(full_disk.iterdir()) == []
    assert _digest(src) == digest


def test_read_only_folder(read_only, model_in):
    src, digest = model_in
    for args in (["quantize", str(src), "--mode", "fp16", "--no-compare", "-o",
                  str(read_only / "q.pt")],
                 ["compress", str(src), "--prune", "0.25", "--min-time", "0.01", "-o",
                  str(read_only / "c.pt")]):
        code, errors = _cli(args)
        assert code == 1 and len(errors) == 1, errors
        assert "read-only file system" in errors[0] or "Read-only file system" in errors[0]
    assert list(read_only.iterdir()) == []
    assert _digest(src) == digest


def test_missing_output_folder(tmp_path, model_in):
    src, digest = model_in
    code, errors = _cli(["prune", str(src), "--ratio", "0.25", "-o",
                         str(tmp_path / "nope" / "p.pt")])
    assert code == 1 and errors == [f"error: output folder {tmp_path / 'nope'} does not exist; "
                                    "create it first"]
    assert not (tmp_path / "nope").exists()
    assert _digest(src) == digest


@pytest.mark.parametrize("code, says", [
    (errno.ENOSPC, "is full"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "no permission to write"),
])
def test_injected_write_errors(tmp_path, code, says):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 1000)  # half a file, then the disk says no
        raise OSError(code, "injected")

    with pytest.raises(TorchslimError, match=says) as info:
        atomic_write(tmp_path / "out.bin", write)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_injected_enospc_in_torch_save(tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError, not OSError."""
    import torch

    model = load_model(FIXTURES / "trained.pt").model

    def broken(obj, f, *a, **k):
        Path(f).write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr("shutil.disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(TorchslimError, match="is full"):
        save_model(model, tmp_path / "m.pt", ModelMeta())
    assert list(tmp_path.iterdir()) == []
