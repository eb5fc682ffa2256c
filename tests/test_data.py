"""Data sources: digits, image folders, tensor files; split and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from torchslim.compress.data import check_classes, load_data, parse_size, split_indices
from torchslim.compress.errors import TorchslimError, UsageError


def test_digits_is_the_real_data_set(digits):
    assert len(digits.train) + len(digits.val) == 1797
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    x = digits.train.tensors[0]
    assert x.min() >= 0 and x.max() <= 1


def test_split_is_stratified_and_deterministic():
    a = load_data("digits", seed=3)
    b = load_data("digits", seed=3)
    c = load_data("digits", seed=4)
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    counts = torch.bincount(a.val.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # each class ~20 % of its ~180 images


def test_resize_to_seed_size_and_train_limit():
    d = load_data("digits", size=(60, 120), train_limit=300)
    assert d.input_shape == (1, 60, 120)
    assert abs(len(d.train) - 300) <= 5
    assert torch.bincount(d.train.tensors[1]).min() >= 28


def _write_folder(root, n_per_class=6, size=(12, 10)):
    rng = np.random.default_rng(0)
    for cls in ("arc", "corona", "void"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = (rng.random(size) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def test_image_folder(tmp_path):
    _write_folder(tmp_path / "pd")
    d = load_data(str(tmp_path / "pd"), size=(6, 8), val_fraction=0.5)
    assert d.class_names == ["arc", "corona", "void"]
    assert d.input_shape == (1, 6, 8)
    assert len(d.train) + len(d.val) == 18
    assert torch.bincount(d.val.tensors[1]).tolist() == [3, 3, 3]
    rgb = load_data(str(tmp_path / "pd"), channels=3)
    assert rgb.input_shape == (3, 12, 10)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TorchslimError, match="no class sub-folders"):
        load_data(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(TorchslimError, match="holds no images"):
        load_data(str(tmp_path / "noimg"))
    _write_folder(tmp_path / "bad")
    (tmp_path / "bad" / "arc" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(TorchslimError, match="cannot read image .*broken.png"):
        load_data(str(tmp_path / "bad"))


def test_npz_and_pt_files(tmp_path):
    x = np.random.default_rng(0).random((40, 5, 5)).astype(np.float32)
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    for name in ("d.npz", "d.pt"):
        d = load_data(str(tmp_path / name), val_fraction=0.3)
        assert d.num_classes == 4 and d.input_shape == (1, 5, 5)
        assert len(d.val) == 12  # 30 % of each class's 10 images
    np.savez(tmp_path / "nox.npz", y=y)
    with pytest.raises(TorchslimError, match="no inputs 'x' or 'x0'"):
        load_data(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(TorchslimError, match="no labels 'y'"):
        load_data(str(tmp_path / "noy.npz"))
    np.savez(tmp_path / "short.npz", x=x[:30], y=y)
    with pytest.raises(TorchslimError, match="every input must have N rows"):
        load_data(str(tmp_path / "short.npz"))


def test_token_ids_and_several_inputs(tmp_path):
    """Non-image data: int64 token ids stay integers, several inputs travel together,
    and the input spec (shape with batch 1, dtype, value bound) comes from the arrays."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 500, (60, 20)).astype(np.int32)
    extra = rng.random((60, 4)).astype(np.float64)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "tok.npz", x=tokens, y=y)
    d = load_data(str(tmp_path / "tok.npz"), val_fraction=0.25)
    assert d.train.tensors[0].dtype == torch.int64 and d.input_shape == (20,)
    assert d.inputs.texts() == [f"1,20:int64:{int(tokens.max()) + 1}"]
    assert not d.is_image and "samples of 1x20 int64" in d.describe()
    np.savez(tmp_path / "two.npz", x0=rng.random((60, 1, 8, 8)).astype(np.float32),
             x1=extra, y=y)
    two = load_data(str(tmp_path / "two.npz"), val_fraction=0.25)
    assert [t.shape for t in two.inputs.tensors] == [(1, 1, 8, 8), (1, 4)]
    assert len(two.train.tensors) == 3 and two.train.tensors[1].dtype == torch.float32
    assert len(two.val) == 15
    with pytest.raises(UsageError, match="apply to image data"):
        load_data(str(tmp_path / "two.npz"), size=(16, 16))


def test_rank3_floats_are_images_unless_the_model_takes_sequences(tmp_path):
    from torchslim.compress.inputs import InputSpec

    x = np.random.default_rng(0).random((40, 16, 32)).astype(np.float32)
    np.savez(tmp_path / "seq.npz", x=x, y=np.repeat(np.arange(4), 10))
    assert load_data(str(tmp_path / "seq.npz")).input_shape == (1, 16, 32)
    seq = load_data(str(tmp_path / "seq.npz"), like=InputSpec.parse(["1,16,32"]))
    assert seq.input_shape == (16, 32) and seq.inputs.texts() == ["1,16,32:float32"]


def test_unknown_dataset_and_class_mismatch(digits):
    with pytest.raises(TorchslimError, match="unknown data set 'mnist'"):
        load_data("mnist")
    with pytest.raises(TorchslimError, match="model outputs 5 classes but digits has 10"):
        check_classes(5, digits)


def test_parse_size():
    assert parse_size("60,120") == (60, 120)
    assert parse_size("60x120") == (60, 120)
    with pytest.raises(UsageError):
        parse_size("sixty")


def test_three_way_split_is_disjoint_and_stratified():
    d = load_data("digits", seed=0, val_fraction=0.2, test_fraction=0.2)
    y = torch.from_numpy(load_digits().target)
    train, val, test = split_indices(y, 0.2, 0.2, 0)
    sets = [set(train.tolist()), set(val.tolist()), set(test.tolist())]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0]) + len(sets[1]) + len(sets[2]) == 1797
    assert len(d.test) == len(test) and abs(len(d.test) - 359) <= 5
    assert abs(len(d.val) - 359) <= 10
    assert torch.bincount(d.test.tensors[1], minlength=10).min() >= 34
    # without a test split the train/val split is what it always was
    plain = load_data("digits", seed=0)
    assert plain.test is None and len(plain.val) == 359


def test_test_fraction_must_leave_training_data():
    with pytest.raises(UsageError, match="--test-fraction"):
        load_data("digits", val_fraction=0.5, test_fraction=0.5)
