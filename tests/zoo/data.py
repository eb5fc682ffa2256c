"""The suite's data sets, written as the .npz files a user would bring (x or x0, x1, y).

Each kind is split once into a part the "user" trains on (``KIND-train.npz``) and a held-out
part (``KIND.npz``) that torchslim's ``--data`` reads, so every accuracy torchslim reports
in the tests is on samples the saved model never trained on.

- ``digits16``: scikit-learn's 1,797 real 8x8 handwritten digits, bilinearly resized to
  1x16x16 (the CNNs' input);
- ``rows``: the same digits resized to 16x32 and read as a sequence of 16 rows of 32
  features (the Transformer encoder's (B, 16, 32) input);
- ``pair``: two inputs per digit, the 1x16x16 image and its 8 column means from the 8x8
  original (the two-input model);
- ``tokens``: SYNTHETIC, not real data: 20 token ids in [4, 50) with three copies of one
  marker token 0..3 at random places; the class is the marker. Learnable only by carrying
  the marker through the sequence, so an LSTM must really work to classify it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT = 600  # samples torchslim sees; the rest train the user's model
VOCAB, SEQ_LEN, MARKERS = 50, 20, 4


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _tokens(n: int = 1800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(MARKERS, VOCAB, (n, SEQ_LEN), generator=gen)
    y = torch.randint(0, MARKERS, (n,), generator=gen)
    for i in range(n):
        where = torch.randperm(SEQ_LEN, generator=gen)[:3]
        x[i, where] = y[i]
    return x, y


def arrays(kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([inputs...], labels) of a kind, in a fixed shuffled order."""
    if kind == "tokens":
        x, y = _tokens()
        return [x], y
    x8, y = _digits()
    if kind == "digits16":
        xs = [_resize(x8, (16, 16))]
    elif kind == "rows":
        xs = [_resize(x8, (16, 32)).squeeze(1)]
    elif kind == "pair":
        xs = [_resize(x8, (16, 16)), x8.mean(dim=2).squeeze(1)]  # (N, 1, 16, 16), (N, 8)
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    return [x[order] for x in xs], y[order]


def _save(path: Path, xs: list[torch.Tensor], y: torch.Tensor) -> None:
    names = ["x"] if len(xs) == 1 else [f"x{i}" for i in range(len(xs))]
    np.savez(path, y=y.numpy(), **{n: x.numpy() for n, x in zip(names, xs, strict=True)})


def write(kind: str, folder: Path) -> Path:
    """Write ``KIND-train.npz`` and ``KIND.npz`` (held out) into ``folder``; returns the
    held-out file, the one torchslim's --data reads."""
    xs, y = arrays(kind)
    _save(folder / f"{kind}-train.npz", [x[HELD_OUT:] for x in xs], y[HELD_OUT:])
    _save(folder / f"{kind}.npz", [x[:HELD_OUT] for x in xs], y[:HELD_OUT])
    return folder / f"{kind}.npz"
