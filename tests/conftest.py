"""Shared fixtures: small real data and tiny trained models, built once per session."""

from __future__ import annotations

import pytest
import torch

from torchslim.compress.data import load_data
from torchslim.compress.io import save_model
from torchslim.compress.train import TrainConfig

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _private_export_cache(tmp_path_factory):
    """ONNX exports made by tests (report --runtime) go to a temporary cache, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path_factory.mktemp("torchslim-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def digits():
    """sklearn's 1,797 real 8x8 digits, 80/20 stratified split."""
    return load_data("digits", seed=0)


@pytest.fixture(scope="session")
def digits16():
    """digits resized to 16x16: big enough for 3 pooling stages, still fast."""
    return load_data("digits", size=(16, 16), seed=0)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, digits):
    """resnet_tiny (5k params) trained 4 epochs on real digits and saved as a torchslim .pt
    (about 90 % validation top-1)."""
    from torchslim.cli.train import train_registry_model

    cfg = TrainConfig(epochs=4, lr=0.01, seed=0)
    model, meta, _ = train_registry_model("resnet_tiny", digits, cfg)
    return save_model(model, tmp_path_factory.mktemp("trained") / "tiny.pt", meta)
