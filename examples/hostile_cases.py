"""Run issue 21's hostile files through the real command and print, per case, the exit
code, the seconds, the peak resident memory of the process and its one line.

Every case must end in one line with exit 1 (2 for usage errors), in seconds and well under
1 GB resident, its input unchanged, and nothing raw from the file reaching the terminal. The
files are built by the helpers in tests/test_hostile.py (the same cases the tests assert).

    python examples/hostile_cases.py            # prints a markdown table
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--threads", "1", "--min-time", "0.02"]


def _helpers():
    spec = importlib.util.spec_from_file_location("hostile", ROOT / "tests" / "test_hostile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(work: Path) -> list[tuple[str, list[str], dict]]:
    """(case, torchslim arguments, extra environment) for every case."""
    import numpy as np
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from torch import nn

    t = _helpers()
    cases = []

    def pt(name, model, shape, raw=False):
        return str(t.save_torchslim(model, work / f"{name}.pt", shape, raw_state=raw))

    mlp = t.mlp()
    evil = work / "evil.pt"
    import torch

    torch.save({"model": t.Planted(str(work / "ran"))}, evil)
    cases.append(("1 TORCHSLIM_TRUST=off", ["report", str(evil)], {"TORCHSLIM_TRUST": "off"}))
    cases.append(("1 TORCHSLIM_TRUST=maybe", ["report", str(evil)], {"TORCHSLIM_TRUST": "maybe"}))
    redirect = t.mlp()
    redirect.__dict__["_compiled_call_impl"] = nn.Identity()
    cases.append(("2 _compiled_call_impl", ["report", pt("redirect", redirect, (8,), True)], {}))
    fwd = t.mlp()
    fwd.__dict__["forward"] = nn.Identity()
    cases.append(("2 forward in __dict__", ["report", pt("forward", fwd, (8,), True)], {}))
    hidden = t.mlp()
    hidden.__dict__["helpers"] = [nn.Identity()]
    cases.append(("2 module outside _modules", ["report", pt("hidden", hidden, (8,), True)], {}))
    cases.append(("3 path and metadata with ESC/[/x]",
                  ["report", str(t.hostile_model(work))], {}))
    cases.append(("3 missing path with ESC/[/x]", ["report", str(work / "n[/x]\x1b[2J.pt")], {}))
    cases.append(("4 conv padding 100000", ["report", pt("pad", nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=100000), nn.Flatten()), (1, 8, 8))], {}))
    cases.append(("4 upsample x30000", ["report", pt("up", nn.Sequential(
        nn.Upsample(scale_factor=30000), nn.Flatten()), (1, 8, 8))], {}))
    cases.append(("4 adaptive pool 100000^2", ["report", pt("pool", nn.Sequential(
        nn.AdaptiveAvgPool2d((100000, 100000)), nn.Flatten()), (1, 8, 8))], {}))
    cases.append(("4 stated input 1x100000x100000", ["report", pt("inp", nn.Sequential(
        nn.Flatten(), nn.Linear(64, 4)), (1, 100000, 100000))], {}))
    lin = nn.Linear(8, 4)
    lin.in_features = lin.out_features = 100000
    cases.append(("4 Linear attrs vs weight (swap)",
                  ["swap", pt("attrs", nn.Sequential(lin), (8,)), "-o", str(work / "o.pt")], {}))
    cases.append(("4 ONNX ConstantOfShape 1e10", ["report", str(t.onnx_file(
        work / "cos.onnx", [h.make_node("ConstantOfShape", ["s"], ["c"],
                                        value=nh.from_array(np.array([1.0], np.float32))),
                            h.make_node("ReduceSum", ["c"], ["r"], keepdims=0),
                            h.make_node("Add", ["x", "r"], ["y"])],
        [t.i64("s", [100000, 100000])]))], {}))
    cases.append(("4 ONNX Expand 4e10", ["report", str(t.onnx_file(
        work / "expand.onnx", [h.make_node("Expand", ["x", "s"], ["e"]),
                               h.make_node("ReduceSum", ["e"], ["y"], keepdims=0)],
        [t.i64("s", [100000, 100000, 4])]))], {}))
    cases.append(("4 ONNX endless Loop", ["report", str(t.loop_file(work / "loop.onnx", None))],
                  {}))
    fifo = work / "pipe.npz"
    os.mkfifo(fifo)
    cases.append(("4 FIFO as --data", ["report", pt("ok", mlp, (8,)), "--data", str(fifo)], {}))
    return cases


def run(args: list[str], env: dict) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS bytes of that process, its output)."""
    cmd = [str(Path(sys.executable).parent / "torchslim"), *args,
           *(FAST if args[0] == "report" else [])]
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
        timer = threading.Timer(120, proc.kill)  # a hang shows as a kill, not a stuck run
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        took = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status), took, usage.ru_maxrss * 1024, text


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        work = Path(tmp)
        cases = build(work)
        sums = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in work.rglob("*") if p.is_file()}
        print("| case | exit | s | peak RSS MB | raw ESC in output | output (first line) |")
        print("|---|---|---|---|---|---|")
        for name, args, env in cases:
            code, took, rss, text = run(args, env)
            first = text.strip().splitlines()[0][:110] if text.strip() else ""
            esc = "\x1b" in text
            print(f"| {name} | {code} | {took:.1f} | {rss / 2**20:.0f} | {esc} | "
                  f"{first.replace('|', '/')} |")
        changed = [p.name for p, s in sums.items()
                   if p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() != s]
        print(f"\ninputs changed: {changed or 'none'}; code ran without trust: "
              f"{(work / 'ran').exists()}")


if __name__ == "__main__":
    main()
