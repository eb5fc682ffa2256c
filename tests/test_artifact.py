"""Self-contained outputs (.onnx, .pt2): what torch.export cannot build is refused, not
written half-working."""

from __future__ import annotations

import pytest
from torch import nn

from torchslim.compress.artifact import write_model
from torchslim.compress.errors import TorchslimError
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
def test_a_submodule_named_like_a_graphmodule_attribute_is_refused_with_the_fix(tmp_path,
                                                                                 suffix):
    """torch.export's GraphModule has its own ``meta``: a submodule called ``meta`` exports,
    but the program never becomes a module again. The .pt2 was written and failed at load
    ("references nonexistent attribute 0 of meta"); now neither file is written, and the
    message says which attribute to rename."""
    path = tmp_path / f"m{suffix}"
    spec = InputSpec.parse(["1,8"])
    with pytest.raises(TorchslimError, match=r"submodule named 'meta'.*rename that attribute"):
        write_model(Fusion("meta").eval(), path, ModelMeta(), spec=spec)
    assert not path.exists()
    write_model(Fusion("tabular").eval(), path, ModelMeta(), spec=spec)  # renamed: fine
    assert path.stat().st_size > 0
