"""The CLI through CliRunner and through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from torchslim import __version__
from torchslim.cli.app import app
from torchslim.compress.io import load_model

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.05"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnet_tiny (5k params) trained 4 epochs on digits through the CLI itself."""
    out = tmp_path_factory.mktemp("cli") / "tiny.pt"
    res = runner.invoke(app, ["train", "resnet_tiny", "--data", "digits", "--epochs", "4",
                              "--lr", "0.01", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "best validation top-1" in res.stdout
    return out


def test_train_reaches_real_accuracy_and_records_history(trained):
    loaded = load_model(trained)
    assert loaded.meta.input_shape == (1, 8, 8)
    assert loaded.meta.class_names == [str(i) for i in range(10)]
    (step,) = loaded.meta.history
    assert step["method"] == "train"
    # 4 epochs of a 5k-param residual CNN on real digits reach ~93 %; chance is 10 %
    assert step["after"]["accuracy"] >= 85.0
    assert step["after"]["params"] == sum(p.numel() for p in loaded.model.parameters())


def test_report_json_keys_and_numbers(trained):
    res = runner.invoke(app, ["report", str(trained), "--data", "digits", "--format", "json",
                              *FAST])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    keys = {"model", "params", "nonzero_params", "file_bytes", "macs", "latency_ms_median",
            "latency_ms_p90", "batch_size", "threads", "accuracy", "top5"}
    assert keys <= set(row)
    model = load_model(trained).model
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["file_bytes"] == trained.stat().st_size
    assert row["macs"] > 0 and row["latency_ms_p90"] >= row["latency_ms_median"] > 0
    assert row["threads"] == 1
    hist_acc = load_model(trained).meta.history[0]["after"]["accuracy"]
    assert abs(row["accuracy"] - hist_acc) < 1e-6  # same val split, same weights
    assert row["top5"] >= row["accuracy"]
    assert row["history"][0]["method"] == "train"


def test_report_two_models_has_ratios(trained, tmp_path):
    half = load_model(trained).model.half()
    torch.save(half, tmp_path / "half.pt")
    res = runner.invoke(app, ["report", str(trained), str(tmp_path / "half.pt"), "--trust",
                              "--input-shape", "1,8,8", "-f", "markdown", *FAST])
    assert res.exit_code == 0, res.output
    assert "x smaller" in res.stdout and "History of" in res.stdout
    res = runner.invoke(app, ["report", str(trained), str(trained), "-f", "json", *FAST])
    rows = json.loads(res.stdout)
    assert rows[1]["size_ratio"] == pytest.approx(1.0)


def test_report_csv(trained):
    res = runner.invoke(app, ["report", str(trained), "-f", "csv", *FAST])
    assert res.exit_code == 0, res.output
    header, row = res.stdout.strip().splitlines()[:2]
    assert header.startswith("model,") and str(trained) in row


def test_models_lists_registry():
    res = runner.invoke(app, ["models", "pd*", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert {"pd_model", "pd_light", "pd_tiny"} <= set(rows)
    assert rows["pd_model"]["params"] > rows["pd_light"]["params"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["report", "missing.pt"], 1, "model file not found: missing.pt"),
        (["report", "{tiny}", "--input-shape", "a,b"], 2, "--input-shape must be integers"),
        (["report", "{tiny}", "--input-shape", "3,32,32"], 1, "does not fit"),
        (["report", "{tiny}", "--data", "mnist"], 1, "unknown data set 'mnist'"),
        (["report", "{tiny}", "--format", "xml"], 2, "--format must be one of"),
        (["train", "nope", "-o", "{out}"], 1, "unknown model 'nope'"),
        (["train", "mlp_tiny", "--epochs", "-1", "-o", "{out}"], 2, "--epochs must be >= 0"),
        (["train", "mlp_tiny", "-o", "{tiny}"], 1, "exists; pass --force"),
    ],
)
def test_errors_are_one_line_with_exit_code(trained, tmp_path, args, code, message):
    args = [a.format(tiny=trained, out=tmp_path / "o.pt") for a in args]
    before = trained.read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert trained.read_bytes() == before
    assert not (tmp_path / "o.pt").exists()


def test_state_dict_without_arch_and_untrusted_pickle(tmp_path, trained):
    model = load_model(trained).model
    torch.save(model.state_dict(), tmp_path / "w.pth")
    res = runner.invoke(app, ["report", str(tmp_path / "w.pth")])
    assert res.exit_code == 1 and "pass --arch" in res.stderr
    res = runner.invoke(app, ["report", str(tmp_path / "w.pth"), "--arch", "resnet_tiny",
                              "--input-shape", "1,8,8", "-f", "json", *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["params"] == sum(p.numel() for p in model.parameters())


def _console_script() -> str:
    exe = Path(sys.executable).parent / "torchslim"
    return str(exe) if exe.exists() else shutil.which("torchslim")


def test_installed_console_script(trained):
    exe = _console_script()
    assert exe, "the torchslim console script is not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"torchslim {__version__}"
    res = subprocess.run([exe, "report", str(trained), "-f", "json", *FAST],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["file_bytes"] == trained.stat().st_size
    bad = subprocess.run([exe, "report", "nope.pt"], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    verbose = subprocess.run([exe, "report", "nope.pt", "--verbose"], capture_output=True,
                             text=True)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_python_dash_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torchslim", "--help"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0 and "report" in out.stdout
