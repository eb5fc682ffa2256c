"""IDX files (the MNIST / Fashion-MNIST format) and the folders that hold them.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values. The reader is strict: a
file whose length does not match its header is refused, since a truncated download would
otherwise train on silently missing images.

A data folder holds ``PREFIX-images-idx3-ubyte[.gz]`` + ``PREFIX-labels-idx1-ubyte[.gz]``
pairs: ``train`` is required, ``t10k`` (or ``test``) is the official test split.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import TorchslimError

# type code -> numpy dtype; multi-byte values are big-endian
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (N, H, W)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (N,)
_FILE = re.compile(r"^(?P<prefix>.+)-(?P<kind>images-idx3|labels-idx1)-ubyte(?P<gz>\.gz)?$")
TRAIN_PREFIXES = ("train",)
TEST_PREFIXES = ("t10k", "test")

# Data sets installed from a system package, found by name.
SYSTEM_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages put them
ENV_VAR = "TORCHSLIM_DATA"  # a folder holding NAME/ sub-folders, searched before SYSTEM_DIR
NAMED = {
    "fashion-mnist": {
        "package": "dataset-fashion-mnist",
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot"],
    },
}


@dataclass
class IdxData:
    """Images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64: the train rows first,
    then the official test rows (the last ``n_test``; 0 when the folder has none)."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    n_test: int


def read_idx(path: Path) -> np.ndarray:
    """The array in one IDX file (gzipped or not), shaped as its header says."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise TorchslimError(f"{path} is truncated: {len(raw)} bytes, shorter than an IDX "
                             "header; download the file again")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise TorchslimError(f"{path} is not an IDX file (magic number 0x{magic:08x}); "
                             "expected 0x00000803 for images or 0x00000801 for labels")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TorchslimError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise TorchslimError(
            f"{path} is {what}: the header gives shape {'x'.join(map(str, dims))} = "
            f"{expected} bytes of data, the file holds {len(raw) - header}; download it again")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise TorchslimError(f"{path} is a truncated or corrupt gzip file ({exc}); download "
                             "it again") from exc
    except OSError as exc:
        raise TorchslimError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) uint8 of one split, checked against each other."""
    x, y = read_idx(images), read_idx(labels)
    _expect(images, x, IMAGES_MAGIC, "images")
    _expect(labels, y, LABELS_MAGIC, "labels")
    if len(x) != len(y):
        raise TorchslimError(f"{images.name} holds {len(x)} images but {labels.name} holds "
                             f"{len(y)} labels; the two files must come from the same split")
    if len(x) == 0:
        raise TorchslimError(f"{images} holds no images")
    return x, y


def _expect(path: Path, arr: np.ndarray, magic: int, what: str) -> None:
    if arr.dtype != np.uint8 or arr.ndim != (magic & 0xFF):
        got = f"{arr.dtype} values in {arr.ndim} dims"
        raise TorchslimError(f"{path} should hold {what} (magic 0x{magic:08x}: unsigned bytes "
                             f"in {magic & 0xFF} dims) but holds {got}; check the file names")


# --- folders ------------------------------------------------------------------------------


def idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    """(prefix, "images"|"labels") -> file; a plain file wins over its .gz (no decompressing)."""
    found: dict[tuple[str, str], Path] = {}
    for f in sorted(folder.iterdir()):
        m = _FILE.match(f.name)
        if m is None or not f.is_file():
            continue
        key = (m["prefix"], m["kind"].split("-")[0])
        if key not in found or not m["gz"]:
            found[key] = f
    return found


def is_idx_folder(path: Path) -> bool:
    return path.is_dir() and bool(idx_files(path))


def named_folder(name: str) -> Path:
    """Where the installed data set ``name`` lives: $TORCHSLIM_DATA/NAME, then SYSTEM_DIR/NAME."""
    roots = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    for root in [*roots, SYSTEM_DIR]:
        if (root / name).is_dir() and idx_files(root / name):
            return root / name
    raise TorchslimError(
        f"{name} is not installed: run `sudo apt-get install {NAMED[name]['package']}` "
        f"(Debian/Ubuntu), or put its IDX files in ${ENV_VAR}/{name}, or pass --data DIR "
        "with the folder that holds them")


def load_folder(folder: Path, class_names: list[str] | None = None) -> IdxData:
    """The train pair, then the official test pair when there is one, as tensors."""
    files = idx_files(folder)
    train = _pair(folder, files, TRAIN_PREFIXES, required=True)
    test = _pair(folder, files, TEST_PREFIXES, required=False)
    x, y = read_pair(*train)
    n_test = 0
    if test is not None:
        xt, yt = read_pair(*test)
        if xt.shape[1:] != x.shape[1:]:
            raise TorchslimError(f"{test[0].name} has {xt.shape[1]}x{xt.shape[2]} images but "
                                 f"{train[0].name} {x.shape[1]}x{x.shape[2]}; use one data set")
        x, y, n_test = np.concatenate([x, xt]), np.concatenate([y, yt]), len(xt)
    classes = int(y.max()) + 1
    if class_names is not None and classes > len(class_names):
        raise TorchslimError(f"{folder} has label {classes - 1}, beyond its "
                             f"{len(class_names)} classes; the files are not this data set")
    names = class_names or [str(i) for i in range(classes)]
    # uint8 -> float32 once, for all rows (a new, writable array): (N, 1, H, W) in [0, 1]
    images = torch.from_numpy(x.astype(np.float32)).unsqueeze(1).div_(255.0)
    return IdxData(images, torch.from_numpy(y.astype(np.int64)), names, n_test)


def _pair(folder: Path, files: dict, prefixes: tuple[str, ...], required: bool):
    for prefix in prefixes:
        images, labels = files.get((prefix, "images")), files.get((prefix, "labels"))
        if images and labels:
            return images, labels
        if images or labels:
            missing = "labels-idx1" if images else "images-idx3"
            raise TorchslimError(f"{folder} has {(images or labels).name} but no "
                                 f"{prefix}-{missing}-ubyte[.gz]; add the missing file")
    if required:
        have = ", ".join(sorted({p for p, _ in files})) or "none"
        raise TorchslimError(f"{folder} has no train-images-idx3-ubyte[.gz] + "
                             f"train-labels-idx1-ubyte[.gz] pair (IDX prefixes found: {have})")
    return None


def load(spec: str) -> tuple[IdxData, str] | None:
    """(data, display name) when ``spec`` names an installed IDX set or a folder of IDX
    files; None for anything else, so other loaders get their turn."""
    if spec in NAMED:
        return load_folder(named_folder(spec), NAMED[spec]["classes"]), spec
    path = Path(spec)
    if is_idx_folder(path):
        return load_folder(path), path.name
    return None
