"""The goal search on third-party-style mobile CNNs, as a user runs it.

MobileNetV3, EfficientNet and RegNet written the way torchvision writes them (tests/zoo/:
inverted residuals with squeeze-excitation, MBConv, grouped bottlenecks; not torchslim's
classes), built with random weights, trained briefly on the search's training split of
digits at 16x16, saved with ``torch.save(model)``, then compressed with

    torchslim compress NAME.pt --trust --code-path tests/zoo --data digits --image-size 16,16 \\
        --max-acc-drop 1 --objective size --time-budget 3m -o NAME-slim.onnx

Most of their convolutions are 1x1 or depthwise: the search finds what applies before it
starts, says what it left out, records failed candidates and keeps going. Prints one row per
model: size ratio, test accuracy of the input and of the chosen model, minutes, exit status.

    python examples/bench_search_mobile.py [--budget 3m] [--epochs 8] [NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from torchslim.compress.data import load_data

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "tests" / "zoo"
NAMES = ("mobilenetv3", "efficientnet", "regnet")


def train(model, data, epochs: int, lr: float = 1e-2, batch: int = 32):
    """The user's own training loop, on the training split only (validation and test stay
    held out for the search)."""
    xs, y = data.train.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(y) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            loss = F.cross_entropy(model(xs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def run(name: str, folder: Path, data, budget: str, epochs: int) -> dict:
    sys.path.insert(0, str(ZOO))
    module = importlib.import_module(name)
    torch.manual_seed(0)
    model = train(module.build(), data, epochs)
    src = folder / f"{name}.pt"
    torch.save(model, src)
    out = folder / f"{name}-slim.onnx"
    cmd = [sys.executable, "-m", "torchslim", "compress", str(src), "--trust", "--code-path",
           str(ZOO), "--data", "digits", "--image-size", "16,16", "--max-acc-drop", "1",
           "--objective", "size", "--time-budget", budget, "-o", str(out),
           "--workdir", str(folder / f"wd-{name}")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    minutes = (time.perf_counter() - start) / 60
    doc_path = folder / f"{name}-slim.pareto.json"
    if not doc_path.exists():
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "exit": proc.returncode, "minutes": minutes, "note": tail}
    doc = json.loads(doc_path.read_text())
    base = doc["baseline"]
    chosen = next((c for c in doc["candidates"] if c["key"] == doc["chosen"]), None)
    return {"model": name, "params": base["params"], "exit": proc.returncode,
            "status": doc["status"], "minutes": minutes, "base": base, "chosen": chosen,
            "candidates": len(doc["candidates"]), "failed": len(doc["failed"]),
            "left_out": doc["left_out"], "stopped": doc["stopped"]}


def row(r: dict) -> list:
    c, b = r.get("chosen"), r.get("base")
    if b is None:
        return [r["model"], "", "", "", "", "", f"{r['minutes']:.1f}", r["exit"], r["note"]]
    left = "; ".join(n.split(":")[0] for n in r["left_out"]) or "-"
    return [r["model"], f"{r['params']:,}", f"{b['test_accuracy']:.2f}",
            f"{c['label']}" if c else "-",
            f"{b['file_bytes'] / c['file_bytes']:.2f}x" if c else "-",
            f"{c['test_accuracy']:.2f}" if c else "-", f"{r['minutes']:.1f}",
            f"{r['exit']} ({r['status']})",
            f"{r['candidates']} cand., {r['failed']} failed; left out: {left}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(NAMES))
    ap.add_argument("--budget", default="3m", help="each search's --time-budget")
    ap.add_argument("--epochs", type=int, default=8, help="the user's training epochs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits", size=(16, 16), seed=0)  # the split the search makes too
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-search-mobile-") as tmp:
        for name in args.names:
            r = run(name, Path(tmp), data, args.budget, args.epochs)
            rows.append(row(r))
            said = {k: r.get(k) for k in ("exit", "status", "stopped", "left_out")}
            print(f"{name}: {json.dumps(said)}", flush=True)
    print(tabulate(rows, headers=["model", "params", "input test %", "chosen",
                                  "x smaller", "chosen test %", "min", "exit", "search"]))


if __name__ == "__main__":
    main()
