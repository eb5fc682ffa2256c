"""Running torchslim's CLI in-process on the zoo, and running what it wrote.

Shared by tests/test_zoo.py and examples/zoo_matrix.py, so the table in the closing note
comes from the very invocations the tests assert on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress.inputs import InputSpec
from torchslim.compress.io import load_model

from . import project

FAST = ["--threads", "1", "--min-time", "0.01"]
_runner = CliRunner()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        """The one-line error (after ``error:``), or '' when there is none."""
        lines = [line for line in self.stderr.splitlines() if "error: " in line]
        if not lines:
            return ""
        line = lines[-1]
        return " ".join(line[line.index("error: ") + len("error: "):].split())

    @property
    def outcome(self) -> str:
        """ok, refused (a clear error, exit 1/2) or FAIL (internal error, crash)."""
        if self.code == 0:
            return "ok"
        if self.message and not self.message.startswith("internal error") and \
                self.code in (1, 2):
            return "refused"
        return "FAIL"


def invoke(args: list[str]) -> Result:
    """``torchslim ARGS`` in this process (the caller has chdir'd into the project)."""
    res = _runner.invoke(app, [str(a) for a in args])
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += f"\nerror: uncaught {type(res.exception).__name__}: {res.exception}"
    return Result(res.exit_code, res.stdout, stderr)


def spec(name: str) -> InputSpec:
    """The family's inputs as its CLI flags state them."""
    flags = project.inputs(name)
    if flags[0] == "--input-shape":
        return InputSpec.image(tuple(int(d) for d in flags[1].split(",")[-3:]))
    return InputSpec.parse(flags[1::2])


def held_out(root: Path, name: str, n: int | None = None):
    """The held-out data torchslim's --data reads: ([inputs...], labels), first ``n``."""
    with np.load(project.data_file(root, name)) as f:
        keys = ["x"] if "x" in f.files else sorted(k for k in f.files if k.startswith("x"))
        xs = [torch.from_numpy(f[k][:n]) for k in keys]
        return xs, torch.from_numpy(f["y"][:n])


def run_torch(path: Path, xs, trust: bool = True) -> torch.Tensor:
    """Load a .pt / .pt2 as torchslim does and run it."""
    model = load_model(path, trust=trust).model
    with torch.no_grad():
        return model(*xs)


def run_onnx(path: Path, xs) -> torch.Tensor:
    """Run an .onnx file with onnxruntime alone: no torch module, no pickle, no user code."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
    return torch.from_numpy(sess.run(None, feeds)[0])


def run_any(path: Path, xs) -> torch.Tensor:
    return run_onnx(path, xs) if path.suffix == ".onnx" else run_torch(path, xs)
