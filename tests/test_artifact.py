"""Self-contained outputs (.onnx, .pt2) of a model whose names clash with torch.export's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from torchslim.compress.artifact import write_model
from torchslim.compress.inputs import InputSpec
from torchslim.compress.io import ModelMeta


class Fusion(nn.Module):
    """A branch for metadata features, named the way users name it: ``self.meta``."""

    def __init__(self, branch: str):
        super().__init__()
        self.branch = branch
        setattr(self, branch, nn.Sequential(nn.Linear(8, 4), nn.ReLU()))

    def forward(self, x):
        return getattr(self, self.branch)(x)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_submodule_named_like_a_graphmodule_attribute_exports_and_reloads(tmp_path, suffix):
    """torch.export's GraphModule has its own ``meta``: exported at the top level, a
    submodule called ``meta`` gave a program that never became a module again ("references
    nonexistent attribute 0 of meta"). torchslim exports the model one level down, so the
    file is written, reloads, and computes what the eager model computes."""
    torch.manual_seed(0)
    model = Fusion("meta").eval()
    path = tmp_path / f"m{suffix}"
    write_model(model, path, ModelMeta(), spec=InputSpec.parse(["1,8"]))
    x = torch.randn(3, 8)  # another batch size than the export's: the batch axis is dynamic
    with torch.no_grad():
        ref = model(x)
    if suffix == ".pt2":
        out = torch.export.load(str(path)).module()(x)
    else:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"input": x.numpy().astype(np.float32)})[0])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
