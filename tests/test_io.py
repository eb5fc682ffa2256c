"""Model files: every kind loads, torchslim files need no trust, bad files fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import ModelMeta, atomic_write, load_model, save_model
from torchslim.models.registry import create_model


class UserNet(nn.Module):  # a class torchslim does not know: its pickle needs --trust
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return create_model("pd_tiny", num_classes=10, in_channels=1, input_size=(16, 16)).eval()


def test_torchslim_file_round_trip_without_trust(tmp_path, tiny):
    meta = ModelMeta(input_shape=(1, 16, 16), class_names=list("0123456789"),
                     history=[{"method": "train", "config": {}, "before": {}, "after": {}}])
    path = save_model(tiny, tmp_path / "m.pt", meta)
    loaded = load_model(path)
    x = torch.randn(4, 1, 16, 16)
    assert loaded.kind == "torchslim"
    assert torch.equal(loaded.model(x), tiny(x))
    assert loaded.meta.input_shape == (1, 16, 16)
    assert loaded.meta.history[0]["method"] == "train"
    assert loaded.file_bytes == path.stat().st_size


def test_reshaped_model_reloads_in_fresh_process(tmp_path, tiny):
    """Structural edits (here a swapped-in Sequential) survive with no --trust."""
    tiny.extra = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Hardswish())
    path = save_model(tiny, tmp_path / "m.pt", ModelMeta())
    x = torch.randn(2, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch;from torchslim.compress.io import load_model;"
        f"m=load_model(r'{path}').model;x=torch.load(r'{tmp_path / 'x.pt'}');"
        f"torch.save(m(x), r'{tmp_path / 'y.pt'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), tiny(x))


def test_pickle_needs_trust(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHSLIM_TRUST", raising=False)
    net = UserNet().eval()
    path = tmp_path / "user.pt"
    torch.save(net, path)
    with pytest.raises(TorchslimError, match="pass --trust"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert loaded.kind == "pickle"
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.model(x), net(x))
    monkeypatch.setenv("TORCHSLIM_TRUST", "1")
    assert load_model(path).kind == "pickle"


def test_torchscript_loads_for_measurement(tmp_path, tiny):
    path = tmp_path / "m.ts"
    torch.jit.trace(tiny, torch.randn(1, 1, 16, 16)).save(str(path))
    with pytest.raises(TorchslimError, match="is TorchScript, which runs the code inside it"):
        load_model(path)  # its scripted code would run: only with --trust
    loaded = load_model(path, trust=True)
    x = torch.randn(2, 1, 16, 16)
    assert loaded.kind == "torchscript"
    assert torch.allclose(loaded.model(x), tiny(x), atol=1e-6)


def test_state_dict_with_arch(tmp_path, tiny):
    path = tmp_path / "w.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(TorchslimError, match="pass --arch"):
        load_model(path)
    loaded = load_model(path, arch="pd_tiny", input_size=(16, 16))
    x = torch.randn(2, 1, 16, 16)
    assert loaded.kind == "state_dict"
    assert torch.equal(loaded.model(x), tiny(x))
    with pytest.raises(TorchslimError, match="does not fit --arch pd_model"):
        load_model(path, arch="pd_model", input_size=(16, 16))


def test_arch_module_class_needs_trust(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(UserNet().state_dict(), path)
    with pytest.raises(TorchslimError, match="--trust"):
        load_model(path, arch="test_io:UserNet")
    assert load_model(path, arch="test_io:UserNet", trust=True).kind == "state_dict"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\x80\x04garbage that is not a model"), "not a readable"),
        (lambda p: p.write_text("{}"), "not a readable"),
    ],
)
def test_bad_files_fail_clearly(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(TorchslimError, match=message):
        load_model(path)


def test_truncated_file(tmp_path, tiny):
    good = save_model(tiny, tmp_path / "m.pt", ModelMeta())
    bad = tmp_path / "cut.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TorchslimError, match="corrupt or truncated|not a readable"):
        load_model(bad)


def test_save_refuses_existing_and_input(tmp_path, tiny):
    path = save_model(tiny, tmp_path / "m.pt", ModelMeta())
    before = path.read_bytes()
    with pytest.raises(TorchslimError, match="exists; pass --force"):
        save_model(tiny, path, ModelMeta())
    with pytest.raises(TorchslimError, match="is an input file"):
        save_model(tiny, path, ModelMeta(), force=True, inputs=[path])
    assert path.read_bytes() == before


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_user_class_is_saved_and_needs_trust_to_reload(tmp_path):
    """A model of the user's own classes is written anyway, naming what it needs; it then
    loads only with --trust, like the pickle it came from, and computes the same."""
    model = UserNet().eval()
    save_model(model, tmp_path / "u.pt", ModelMeta())
    with pytest.raises(TorchslimError, match=r"code outside torch and torchslim \(.*UserNet"):
        load_model(tmp_path / "u.pt")
    loaded = load_model(tmp_path / "u.pt", trust=True)
    assert loaded.kind == "torchslim" and loaded.meta.requires[0].endswith("UserNet")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.model(x), model(x))


def test_pt2_output_round_trips_quietly(tmp_path, caplog):
    """A .pt2 is saved under a .pt2 name before its atomic rename (torch.export.save
    logged a warning about the temporary file's suffix), and reloads with --trust."""
    import logging

    from torchslim.compress.artifact import write_model
    from torchslim.compress.inputs import InputSpec

    torch.manual_seed(0)
    model = UserNet().eval()
    with caplog.at_level(logging.WARNING):
        path = write_model(model, tmp_path / "m.pt2", ModelMeta(),
                           spec=InputSpec.parse(["1,64"]))
    assert not [r for r in caplog.records if ".pt2" in r.getMessage()]
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary file left
    loaded = load_model(path, trust=True)
    x = torch.randn(3, 64)
    assert loaded.kind == "exported"
    assert loaded.meta.input_spec().texts() == ["1,64:float32"]
    torch.testing.assert_close(loaded.model(x), model(x))
