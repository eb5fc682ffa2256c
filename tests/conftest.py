"""Shared fixtures: small real data and tiny trained models, built once per session."""

from __future__ import annotations

import pytest
import torch

from torchslim.compress.data import load_data

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    """sklearn's 1,797 real 8x8 digits, 80/20 stratified split."""
    return load_data("digits", seed=0)


@pytest.fixture(scope="session")
def digits16():
    """digits resized to 16x16: big enough for 3 pooling stages, still fast."""
    return load_data("digits", size=(16, 16), seed=0)
