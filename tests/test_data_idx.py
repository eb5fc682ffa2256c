"""IDX files (the Fashion-MNIST format): strict reading, folders, the official split.

Every file here is generated in tmp_path; nothing needs the dataset-fashion-mnist package.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from torchslim.compress import idx
from torchslim.compress.data import load_data
from torchslim.compress.errors import TorchslimError


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: 0, 0, type code, ndim, big-endian dims, values (big-endian)."""
    dtype = np.dtype(idx.IDX_DTYPES[code])
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dtype).tobytes()


def write(path, data: bytes):
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_split(rng, n_per_class: int, classes: int = 4, size=(6, 5)):
    y = np.repeat(np.arange(classes, dtype=np.uint8), n_per_class)
    # each class a different brightness, so the images say which class they are
    x = (y[:, None, None] * (235 // classes) + rng.integers(0, 20, (len(y), *size)))
    x = x.astype(np.uint8)
    return x, y


def write_folder(root, gz: bool = True, test: bool = True, n_train=10, n_test=3):
    """train (and t10k) pairs of a 4-class, 6x5 set; returns the arrays written."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    splits = {"train": make_split(rng, n_train)}
    if test:
        splits["t10k"] = make_split(rng, n_test)
    for prefix, (x, y) in splits.items():
        write(root / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(x))
        write(root / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(y))
    return splits


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_every_type(tmp_path, suffix):
    arr = np.arange(24).reshape(2, 3, 4)
    for code in idx.IDX_DTYPES:
        got = idx.read_idx(write(tmp_path / f"a{code}{suffix}", idx_bytes(arr, code)))
        assert got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got.astype(np.int64), arr)


@pytest.mark.parametrize("gz", [True, False])
def test_folder_keeps_the_official_split(tmp_path, gz):
    splits = write_folder(tmp_path / "fm", gz=gz)
    d = load_data(str(tmp_path / "fm"), val_fraction=0.2, seed=0)
    assert d.name == "fm" and d.input_shape == (1, 6, 5) and d.num_classes == 4
    assert d.class_names == ["0", "1", "2", "3"]
    # the test set is the t10k files, row for row
    xt, yt = splits["t10k"]
    assert torch.equal(d.test.tensors[1], torch.from_numpy(yt.astype(np.int64)))
    torch.testing.assert_close(d.test.tensors[0][:, 0], torch.from_numpy(xt) / 255.0)
    # val is carved from train, stratified: 2 of each class's 10, disjoint from train
    assert len(d.train) == 32 and len(d.val) == 8
    assert torch.bincount(d.val.tensors[1]).tolist() == [2, 2, 2, 2]
    x_train = torch.from_numpy(splits["train"][0]).float() / 255.0
    train_rows = {tuple(r.flatten().tolist()) for r in d.train.tensors[0]}
    val_rows = {tuple(r.flatten().tolist()) for r in d.val.tensors[0]}
    all_rows = {tuple(r.flatten().tolist()) for r in x_train}
    assert not train_rows & val_rows and train_rows | val_rows == all_rows
    # test_fraction does not carve a second test set out of train
    assert len(load_data(str(tmp_path / "fm"), test_fraction=0.2).test) == 12


def test_folder_without_test_pair_and_train_limit(tmp_path):
    write_folder(tmp_path / "fm", test=False, n_train=20)
    d = load_data(str(tmp_path / "fm"), val_fraction=0.25)
    assert d.test is None and len(d.train) == 60 and len(d.val) == 20
    carved = load_data(str(tmp_path / "fm"), val_fraction=0.25, test_fraction=0.25)
    assert len(carved.test) == 20 and len(carved.train) == 40
    limited = load_data(str(tmp_path / "fm"), val_fraction=0.25, train_limit=20)
    assert torch.bincount(limited.train.tensors[1]).tolist() == [5, 5, 5, 5]
    assert len(limited.val) == 20  # val is not limited


def test_plain_file_wins_over_its_gz(tmp_path):
    write_folder(tmp_path / "fm", gz=True)
    x = np.full((4, 6, 5), 255, np.uint8)
    write(tmp_path / "fm" / "train-images-idx3-ubyte", idx_bytes(x))
    write(tmp_path / "fm" / "train-labels-idx1-ubyte", idx_bytes(np.arange(4, dtype=np.uint8)))
    files = idx.idx_files(tmp_path / "fm")
    assert files[("train", "images")].name == "train-images-idx3-ubyte"
    assert files[("t10k", "images")].name == "t10k-images-idx3-ubyte.gz"


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_file(tmp_path, suffix):
    x, _ = make_split(np.random.default_rng(0), 5)
    data = idx_bytes(x)
    path = write(tmp_path / f"train-images-idx3-ubyte{suffix}", data[:-7])
    with pytest.raises(TorchslimError, match=r"is truncated: the header gives shape 20x6x5 = "
                       r"600 bytes of data, the file holds 593; download it again"):
        idx.read_idx(path)
    write(path, data[:6])
    with pytest.raises(TorchslimError, match="truncated inside its header"):
        idx.read_idx(path)
    write(path, data + b"\x00")
    with pytest.raises(TorchslimError, match="longer than its header says"):
        idx.read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    x, _ = make_split(np.random.default_rng(0), 5)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(x))[:-20])
    with pytest.raises(TorchslimError, match="truncated or corrupt gzip file"):
        idx.read_idx(path)


def test_wrong_magic_number(tmp_path):
    path = write(tmp_path / "x", b"PK\x03\x04" + bytes(40))
    with pytest.raises(TorchslimError, match=r"not an IDX file \(magic number 0x504b0304\); "
                       "expected 0x00000803 for images"):
        idx.read_idx(path)
    # a valid IDX file of the wrong kind: labels where images belong
    write_folder(tmp_path / "fm", gz=False, test=False)
    images = tmp_path / "fm" / "train-images-idx3-ubyte"
    images.write_bytes((tmp_path / "fm" / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(TorchslimError, match=r"should hold images \(magic 0x00000803: unsigned "
                       r"bytes in 3 dims\) but holds uint8 values in 1 dims"):
        load_data(str(tmp_path / "fm"))


def test_image_label_count_mismatch(tmp_path):
    write_folder(tmp_path / "fm", gz=False)
    write(tmp_path / "fm" / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(TorchslimError, match="t10k-images-idx3-ubyte holds 12 images but "
                       "t10k-labels-idx1-ubyte holds 11 labels"):
        load_data(str(tmp_path / "fm"))


def test_incomplete_folders(tmp_path):
    write_folder(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(TorchslimError, match="no t10k-labels-idx1-ubyte"):
        load_data(str(tmp_path / "fm"))
    write_folder(tmp_path / "only-test", gz=False)
    for f in (tmp_path / "only-test").glob("train-*"):
        f.unlink()
    with pytest.raises(TorchslimError, match=r"no train-images.*prefixes found: t10k"):
        load_data(str(tmp_path / "only-test"))


def test_named_set_from_env_var_and_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path / "no-system-datasets")
    monkeypatch.setenv(idx.ENV_VAR, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TorchslimError, match=r"^fashion-mnist is not installed: run `sudo "
                       r"apt-get install dataset-fashion-mnist` .*TORCHSLIM_DATA/fashion-mnist"
                       r".*--data DIR"):
        load_data("fashion-mnist")
    # the same files under $TORCHSLIM_DATA/fashion-mnist load by name, with its class names
    rng = np.random.default_rng(0)
    root = tmp_path / "empty" / "fashion-mnist"
    root.mkdir()
    for prefix, n in (("train", 10), ("t10k", 2)):
        x, y = make_split(rng, n, classes=10)
        write(root / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(x))
        write(root / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(y))
    d = load_data("fashion-mnist", val_fraction=0.1)
    assert d.name == "fashion-mnist" and len(d.test) == 20 and len(d.train) == 90
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"


def test_named_set_refuses_labels_beyond_its_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path)
    x, y = make_split(np.random.default_rng(0), 2, classes=12)
    (tmp_path / "fashion-mnist").mkdir()
    write(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte", idx_bytes(x))
    write(tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte", idx_bytes(y))
    with pytest.raises(TorchslimError, match="has label 11, beyond its 10 classes"):
        load_data("fashion-mnist")


def test_cli_install_hint_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from torchslim.cli.app import app

    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path)
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    result = CliRunner().invoke(app, ["train", "pd_tiny", "--data", "fashion-mnist", "-o",
                                      str(tmp_path / "m.pt")])
    assert result.exit_code == 1
    assert "fashion-mnist is not installed" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.pt").exists()


def test_cli_trains_on_an_idx_folder(tmp_path):
    """The classes differ by brightness, so a tiny MLP separates them within a few epochs
    (no shift augmentation: its zero padding changes the brightness)."""
    from typer.testing import CliRunner

    from torchslim.cli.app import app

    write_folder(tmp_path / "fm", n_train=30)
    out = tmp_path / "m.pt"
    args = ["train", "mlp_tiny", "--data", str(tmp_path / "fm"), "--epochs", "10",
            "--batch-size", "16", "--lr", "0.01", "--no-augment", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    top1 = float(result.output.split("best validation top-1 ")[1].split("%")[0])
    assert top1 >= 90.0 and out.exists()


def test_cli_train_limit_keeps_a_stratified_subset(tmp_path):
    from typer.testing import CliRunner

    from torchslim.cli.app import app

    write_folder(tmp_path / "fm", n_train=30)
    args = ["train", "mlp_tiny", "--data", str(tmp_path / "fm"), "--epochs", "1",
            "--train-limit", "12", "-o", str(tmp_path / "m.pt")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 train / 24 val / 12 test" in " ".join(result.output.split())
    bad = CliRunner().invoke(app, [*args[:-4], "--train-limit", "0", "-o", str(tmp_path / "n.pt")])
    assert bad.exit_code == 2 and not (tmp_path / "n.pt").exists()
