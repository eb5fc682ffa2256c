"""Files torchslim wrote before its loader checked pickle opcodes still load without --trust
and compute what they computed then (tests/fixtures/make_fixtures.py wrote them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from torchslim.compress.data import load_data
from torchslim.compress.io import load_model

FIXTURES = Path(__file__).parent / "fixtures"
INDEX = json.loads((FIXTURES / "fixtures.json").read_text())
MODELS = [n for n in INDEX["files"] if n.endswith((".pt", ".onnx")) and not n.startswith("data")]
KINDS = {"state_dict.pt": "state_dict", "plain_module.pt": "pickle", "int8.onnx": "onnx"}


@pytest.fixture(scope="module")
def refs():
    with np.load(FIXTURES / "reference_outputs.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", MODELS)
def test_old_file_loads_without_trust_and_matches_reference(name, refs, monkeypatch):
    monkeypatch.delenv("TORCHSLIM_TRUST", raising=False)
    path = FIXTURES / name
    arch = "resnet_tiny" if name == "state_dict.pt" else None
    loaded = load_model(path, trust=False, arch=arch, in_channels=1, input_size=(8, 8))
    assert loaded.kind == KINDS.get(name, "torchslim")
    x = torch.from_numpy(refs["x"])
    if loaded.kind == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    else:
        with torch.inference_mode():
            got = loaded.model(x).float().numpy()
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, refs[name], rtol=1e-4, atol=1e-4)
    if loaded.kind in ("torchslim", "onnx"):
        assert loaded.meta.input_shape == (1, 8, 8)


def test_old_data_files_load():
    for name in ("data.npz", "data.pt"):
        split = load_data(str(FIXTURES / name), seed=0)
        assert len(split.train) + len(split.val) == 40
        assert split.input_shape == (1, 8, 8)


def test_old_distill_checkpoint_loads_for_resume():
    from torchslim.cli.distill import _load_resume

    state = _load_resume(FIXTURES / "distill.ckpt")
    assert state["epoch"] == 1
    assert set(state["model"]) == set(state["best_state"])
