"""Real SIGINT / SIGTERM sent to real `torchslim` processes while they work: exit 130 / 143,
one line saying what was kept and how to go on, no partial output, no temp files left,
inputs untouched. All five runs go in parallel, so the file costs one run's time."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
READY_TIMEOUT = 240  # seconds to start working on a busy 2-core CI machine
SETTLE = 1.0  # seconds of work after the ready sign, so the signal lands mid-loop


@dataclass
class Run:
    args: list[str]
    sig: int
    ready: str  # a line on stderr, or "tmp:PREFIX" / "out:NAME" for a file that appears
    root: Path
    proc: subprocess.Popen | None = None
    err: list[str] = field(default_factory=list)
    rc: int | None = None

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def start(self) -> None:
        for d in (self.out, self.tmp, self.root / "in"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "trained.pt", self.root / "in" / "teacher.pt")
        env = {**os.environ, "TMPDIR": str(self.tmp), "COLUMNS": "200",
               "TORCHINDUCTOR_CACHE_DIR": str(self.root / "cache")}  # torch's, kept on purpose
        self.proc = subprocess.Popen([sys.executable, "-m", "torchslim", *self.args],
                                     cwd=self.root, env=env, text=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def is_ready(self) -> bool:
        kind, _, what = self.ready.partition(":")
        if kind == "tmp":
            return any(p.name.startswith(what) for p in self.tmp.iterdir())
        if kind == "out":
            return (self.out / what).exists()
        return any(self.ready in line for line in self.err)

    @property
    def message(self) -> str:
        lines = [ln for ln in self.err if ln.startswith("error:")]
        return lines[-1].strip() if lines else "".join(self.err)[-2000:]


def _scenarios(root: Path) -> dict[str, Run]:
    teacher = "in/teacher.pt"
    return {
        "train": Run(["train", "resnet_tiny", "--data", "digits", "--epochs", "500",
                      "-o", "out/m.pt"], signal.SIGINT, "images", root / "train"),
        "prune": Run(["prune", teacher, "--ratio", "0.5", "--data", "digits", "--epochs", "500",
                      "-o", "out/p.pt"], signal.SIGTERM, "fine-tuning after step", root / "prune"),
        "distill": Run(["distill", "--teacher", teacher, "--student", "mlp_tiny", "--data",
                        "digits", "--epochs", "500", "-o", "out/s.pt"], signal.SIGINT,
                       "out:s.pt.ckpt", root / "distill"),
        "quantize": Run(["quantize", teacher, "--mode", "qat", "--qat-epochs", "500", "--data",
                         "digits", "-o", "out/q.onnx"], signal.SIGTERM, "tmp:torchslim-q-",
                        root / "quantize"),
        "compress": Run(["compress", teacher, "--prune", "0.5", "--distill", "--epochs", "500",
                         "--data", "digits", "-o", "out/c.pt"], signal.SIGTERM,
                        "out:.torchslim-", root / "compress"),
    }


def _out_ready(run: Run) -> bool:  # "out:.torchslim-" is a prefix, not a name
    return run.ready.startswith("out:.") and any(
        p.name.startswith(run.ready[4:]) for p in run.out.iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    runs = _scenarios(root)
    digest = hashlib.sha256((FIXTURES / "trained.pt").read_bytes()).hexdigest()
    for r in runs.values():
        r.start()
    pending, deadline = dict(runs), time.monotonic() + READY_TIMEOUT
    signalled: dict[str, float] = {}
    while pending and time.monotonic() < deadline:
        for name, r in list(pending.items()):
            if r.proc.poll() is not None:
                pending.pop(name)  # ended before the signal: the test reports it
            elif r.is_ready() or _out_ready(r):
                signalled.setdefault(name, time.monotonic() + SETTLE)
            if name in signalled and time.monotonic() >= signalled[name]:
                r.proc.send_signal(r.sig)
                pending.pop(name)
        time.sleep(0.05)
    for r in runs.values():
        try:
            r.rc = r.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.rc = r.proc.wait()
        time.sleep(0.1)  # the reader thread drains the last line
        assert hashlib.sha256((r.root / "in" / "teacher.pt").read_bytes()).hexdigest() == digest
    return runs


@pytest.mark.parametrize("name", ["train", "prune", "distill", "quantize", "compress"])
def test_interrupted_command_exits_cleanly(runs, name):
    r = runs[name]
    assert r.rc == 128 + r.sig, (r.rc, r.message)
    sig = signal.Signals(r.sig).name
    assert r.message.startswith(f"error: interrupted by {sig}: "), r.message
    assert "temporary files were removed" in r.message
    assert "Traceback" not in "".join(r.err)
    assert list(r.tmp.iterdir()) == []  # TemporaryDirectory and mkstemp files are gone
    left = sorted(p.name for p in r.out.iterdir())
    if name == "distill":
        assert left == ["s.pt.ckpt"]  # kept on purpose: it is what --resume continues from
        assert "--resume out/s.pt.ckpt to continue" in r.message
        assert "kept out/s.pt.ckpt" in r.message
    else:
        assert left == []
        assert "no output was written" in r.message
        assert "run the command again" in r.message


def test_distill_resumes_from_what_the_interrupt_kept(runs):
    r = runs["distill"]
    ckpt = r.out / "s.pt.ckpt"
    assert ckpt.exists()
    import torch

    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    done = subprocess.run(
        [sys.executable, "-m", "torchslim", "distill", "--teacher", "in/teacher.pt",
         "--student", "mlp_tiny", "--data", "digits", "--epochs", str(epoch + 1), "-o",
         "out/s.pt", "--resume", "out/s.pt.ckpt", "--format", "json"],
        cwd=r.root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in r.out.iterdir()) == ["s.pt"]  # checkpoint removed at the end
