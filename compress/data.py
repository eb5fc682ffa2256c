"""Data sets: ``digits`` (built in), ``fashion-mnist`` (installed) or any folder of IDX
files, an image folder, or a ``.npz``/``.pt`` tensor file.

Everything is loaded into memory: the target users have hundreds to thousands of small
samples, for which in-memory tensors are simplest and fastest. Images are float32
(N, C, H, W); a tensor file may instead hold any inputs a model takes (token ids as int64,
sequences, several inputs as ``x0, x1, ...``), each split's TensorDataset holding
``(*inputs, labels)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from . import idx
from .bounds import require_regular
from .errors import TorchslimError, UsageError
from .filecheck import check_npz
from .inputs import InputSpec
from .safeload import AlteredFile, load_checked

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
BUILTIN = ("digits",)
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841


@dataclass
class DataSplit:
    train: TensorDataset
    val: TensorDataset
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]  # (C, H, W) for images; the first input's sample shape
    name: str
    # Held out from choosing: a search picks on val and reports on test. None unless asked
    # for (test_fraction) or the data set has an official test split.
    test: TensorDataset | None = None

    @property
    def inputs(self) -> InputSpec:
        """What one sample feeds the model: every tensor but the labels, batch 1."""
        splits = [s for s in (self.train, self.val, self.test) if s is not None and len(s)]
        tensors = [torch.cat([s.tensors[i][:4096] for s in splits])
                   for i in range(len(self.train.tensors) - 1)]
        return InputSpec.from_tensors(tensors)

    def head(self, n: int, split: str = "train") -> tuple[torch.Tensor, ...]:
        """The first ``n`` samples' inputs (no labels), as the model takes them."""
        return tuple(t[:n] for t in getattr(self, split).tensors[:-1])

    @property
    def is_image(self) -> bool:
        return self.inputs.image_shape is not None

    def describe(self) -> str:
        test = f" / {len(self.test)} test" if self.test is not None else ""
        what = "images, " + "x".join(map(str, self.input_shape)) if self.is_image else \
            f"samples of {self.inputs.describe()}"
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} val{test} {what}, "
                f"{self.num_classes} classes")


def load_data(
    spec: str,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    train_limit: int | None = None,
    test_fraction: float = 0.0,
    like: InputSpec | None = None,
    strict_image: bool = True,
) -> DataSplit:
    """Load ``spec`` and split it into stratified, seed-deterministic train/val sets, plus
    a test set when ``test_fraction`` > 0 (carved first, so val and test never overlap).

    ``like`` is the model's input spec when known: a 3-D float array is then kept as
    sequences (N, L, D) if the model takes rank-3 input, else read as grayscale images.
    ``size``/``channels`` resize image data; on other data they are an error when
    ``strict_image`` (the user asked for them), else ignored (taken from a model's shape).
    A data set with an official test split (fashion-mnist, IDX folders with t10k files)
    keeps it as ``test`` and carves val from its train split; ``test_fraction`` is unused."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise UsageError(f"--test-fraction must be in [0, 1) and leave training data, got "
                         f"{test_fraction} with val {val_fraction}")
    xs, y, names, label, n_test = _load_raw(spec, size, channels, like)
    if len(xs) == 1 and xs[0].dim() == 4 and xs[0].is_floating_point():
        xs = [_to_channels(_resize(xs[0], size), channels)]
    elif (size or channels) and strict_image:
        raise UsageError(f"--image-size/--channels apply to image data; {label} holds "
                         f"{', '.join(_dims(x) for x in xs)} arrays")
    if n_test:  # an official test split wins over test_fraction: results stay comparable
        train_idx, val_idx = stratified_split(y[:-n_test], val_fraction, seed)
        test_idx = torch.arange(len(y) - n_test, len(y))
    else:
        train_idx, val_idx, test_idx = split_indices(y, val_fraction, test_fraction, seed)
    if train_limit is not None:
        train_idx = _limit_stratified(train_idx, y, train_limit, seed)

    def subset(idx):
        return TensorDataset(*[x[idx] for x in xs], y[idx])

    return DataSplit(
        train=subset(train_idx),
        val=subset(val_idx),
        num_classes=len(names),
        class_names=names,
        input_shape=tuple(int(d) for d in xs[0].shape[1:]),
        name=label,
        test=subset(test_idx) if test_idx is not None else None,
    )


def _dims(x: torch.Tensor) -> str:
    return "(N, " + ", ".join(map(str, x.shape[1:])) + f") {str(x.dtype).removeprefix('torch.')}"


def split_indices(y: torch.Tensor, val_fraction: float, test_fraction: float, seed: int):
    """(train, val, test) index tensors; test is None when ``test_fraction`` is 0. The
    train/val split for a seed is the same with or without a test set carved off first only
    when test_fraction is 0, so results without a test split stay as they were."""
    if not test_fraction:
        return (*stratified_split(y, val_fraction, seed), None)
    rest, test = stratified_split(y, test_fraction, seed + 7919)
    train_r, val_r = stratified_split(y[rest], val_fraction / (1.0 - test_fraction), seed)
    return rest[train_r], rest[val_r], test


class _Raw(NamedTuple):
    xs: list[torch.Tensor]
    y: torch.Tensor
    names: list[str]
    label: str
    n_test: int = 0  # the last n_test rows are the data set's official test split


def _load_raw(spec, size, channels, like=None) -> _Raw:
    """(inputs, labels, class names, display name, official test rows at the end)."""
    if spec in BUILTIN:
        x, y, names = _digits()
        return _Raw([x], y, names, "digits")
    require_regular(spec, "data")  # a FIFO or device would block or never end
    if (found := idx.load(spec)) is not None:  # fashion-mnist, or a folder of IDX files
        data, label = found
        return _Raw([data.x], data.y, data.class_names, label, data.n_test)
    path = Path(spec)
    if path.is_dir():
        x, y, names = _image_folder(path, size, channels)
        return _Raw([x], y, names, path.name)
    if path.suffix.lower() in (".npz", ".pt", ".pth"):
        if not path.exists():
            raise TorchslimError(f"data file not found: {path}; check the path")
        return _Raw(*_tensor_file(path, like), path.name)
    if not path.exists():
        raise TorchslimError(
            f"unknown data set {spec!r}: not a built-in ({', '.join(BUILTIN)}) or installed "
            f"({', '.join(idx.NAMED)}) set, and no such folder or .npz/.pt file"
        )
    raise TorchslimError(
        f"cannot read data from {path}: expected an image folder (one sub-folder per class) "
        "or a .npz/.pt file holding x and y"
    )


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return x, y, [str(i) for i in range(10)]


def _image_folder(root: Path, size, channels):
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TorchslimError(
            f"image folder {root} has no class sub-folders; lay it out as root/CLASS/img.png"
        )
    mode = "L" if (channels or 1) == 1 else "RGB"
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir()
                       if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())  # no FIFOs
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if size:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as exc:
                raise TorchslimError(f"cannot read image {f} ({exc}); fix or remove it") from exc
            labels.append(label)
    if not images:
        raise TorchslimError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise TorchslimError(
            f"images in {root} have different sizes {sorted(shapes)[:3]}; pass --image-size H,W"
        )
    x = torch.from_numpy(np.stack(images))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor(labels, dtype=torch.int64), classes


TENSOR_FILE_HINT = ("hold the inputs as 'x' (or 'x0', 'x1', ... for a model with several "
                    "inputs, in forward's order) and the labels as 'y'")


def _tensor_file(path: Path, like: InputSpec | None = None):
    try:
        if path.suffix.lower() == ".npz":
            with open(path, "rb") as fh:
                check_npz(fh, path.stat().st_size)  # sizes first: no deflate bomb
                fh.seek(0)
                with np.load(fh, allow_pickle=False) as f:
                    arrays = {k: torch.from_numpy(f[k]) for k in f.files}
        else:
            d = load_checked(path)  # tensors and containers only, sizes checked
            if not isinstance(d, dict):
                raise TorchslimError(f"{path} holds a {type(d).__name__}; {TENSOR_FILE_HINT}")
            arrays = {k: torch.as_tensor(v) for k, v in d.items()}
    except AlteredFile as exc:
        raise TorchslimError(f"cannot read data file {path}: {exc}") from exc
    except TorchslimError:
        raise
    except Exception as exc:  # numpy/torch raise many types for bad files
        raise TorchslimError(f"cannot read data file {path}: {str(exc).splitlines()[0]}") from exc
    xs = _input_arrays(arrays, path)
    if "y" not in arrays:
        raise TorchslimError(f"{path} has no labels 'y'; {TENSOR_FILE_HINT}")
    return _check_tensors(xs, arrays["y"], path, like)


def _input_arrays(arrays: dict, path: Path) -> list[torch.Tensor]:
    if "x" in arrays:
        return [arrays["x"]]
    numbered = []
    while f"x{len(numbered)}" in arrays:
        numbered.append(arrays[f"x{len(numbered)}"])
    if not numbered:
        raise TorchslimError(f"{path} has no inputs 'x' or 'x0'; {TENSOR_FILE_HINT}")
    return numbered


def _check_tensors(xs: list[torch.Tensor], y: torch.Tensor, path: Path, like=None):
    if y.dim() != 1 or any(x.dim() < 1 or len(x) != len(y) for x in xs):
        raise TorchslimError(f"{path}: y must be (N,) labels and every input must have N rows; "
                             f"got y {tuple(y.shape)}, inputs {[tuple(x.shape) for x in xs]}")
    if y.is_floating_point() or y.dtype == torch.bool or (len(y) and y.min() < 0):
        raise TorchslimError(f"{path}: y must hold integer class indices 0..C-1")
    if not len(y):
        raise TorchslimError(f"{path} holds no samples")
    xs = [_as_model_input(x, i, like) for i, x in enumerate(xs)]
    num_classes = int(y.max()) + 1
    if num_classes > MAX_CLASSES:  # the class list is built in memory: a file must not size it
        raise TorchslimError(f"{path}: y holds class index {num_classes - 1}; labels must be "
                             f"0..C-1 with C at most {MAX_CLASSES}")
    return xs, y.long(), [str(i) for i in range(num_classes)]


def _as_model_input(x: torch.Tensor, i: int, like: InputSpec | None) -> torch.Tensor:
    """Floats become float32, integers int64 (what embeddings index with); a 3-D float
    array is read as grayscale images (N, H, W) unless the model takes rank-3 input."""
    if x.dtype == torch.bool:
        return x
    if not x.is_floating_point():
        return x.long()
    x = x.float()
    wanted = like.tensors[i].shape if like is not None and i < len(like.tensors) else None
    if x.dim() == 3 and (wanted is None or len(wanted) == 4):
        x = x.unsqueeze(1)
    return x


def _resize(x: torch.Tensor, size):
    if not size or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _to_channels(x: torch.Tensor, channels):
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    raise UsageError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")


def stratified_split(y: torch.Tensor, val_fraction: float, seed: int):
    """Per class, a seeded shuffle then the first ``val_fraction`` goes to validation."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for cls in torch.unique(y):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _limit_stratified(idx: torch.Tensor, y: torch.Tensor, limit: int, seed: int):
    """Keep ``limit`` training images with class proportions preserved (the small-data case)."""
    if limit >= len(idx):
        return idx
    gen = torch.Generator().manual_seed(seed + 1)
    shuffled = idx[torch.randperm(len(idx), generator=gen)]
    labels = y[shuffled]
    per_class = {int(c): 0 for c in torch.unique(labels)}
    quota = {c: max(1, round(limit * int((labels == c).sum()) / len(idx))) for c in per_class}
    keep = []
    for i, c in zip(shuffled.tolist(), labels.tolist(), strict=True):
        if per_class[c] < quota[c]:
            keep.append(i)
            per_class[c] += 1
    return torch.tensor(sorted(keep), dtype=torch.int64)


def check_classes(model_classes: int, data: DataSplit) -> None:
    if model_classes != data.num_classes:
        raise TorchslimError(
            f"model outputs {model_classes} classes but {data.name} has {data.num_classes}; "
            "use data with the model's classes (or retrain the classifier)"
        )


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"60,120"`` or ``"60x120"`` -> (60, 120)."""
    if not text:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"image size must be H,W like 60,120, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise UsageError(f"image size must be positive, got {text!r}")
    return h, w
