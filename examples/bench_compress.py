"""Benchmark: the demo's compress pipeline on other reference nets, every step measured.

Trains the residual CNN (``resnet_small``) and the MobileNetV3-style net
(``mobilenetv3_small``) on the real digits images, then runs the same pipeline the demo
runs on PDModel (swap -> prune -> distill -> int8) and prints one row per step:
params, file size, MACs, batch-1 CPU latency (median of torch.utils.benchmark blocks)
and validation accuracy, with ratios against the trained input.

    python examples/bench_compress.py                 # ~10 min on 2 cores
    python examples/bench_compress.py --epochs 2      # smoke run, numbers not meaningful
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from torchslim.compress.data import load_data
from torchslim.compress.distill import DistillConfig
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.pipeline import Hooks, run_pipeline
from torchslim.compress.prune import PruneConfig
from torchslim.compress.quantize import QuantizeConfig
from torchslim.compress.swap import SwapConfig
from torchslim.compress.train import TrainConfig, fit
from torchslim.models.registry import create_model

MODELS = ("resnet_small", "mobilenetv3_small")


def train(arch: str, data, epochs: int, path: Path) -> Path:
    torch.manual_seed(0)
    c, h, w = data.input_shape
    model = create_model(arch, num_classes=data.num_classes, in_channels=c, input_size=(h, w))
    result = fit(model, data, TrainConfig(epochs=epochs, lr=3e-3, seed=0))
    print(f"{arch}: trained {epochs} epochs, best val top-1 {result.best_top1:.2f}%")
    meta = ModelMeta(input_shape=data.input_shape, class_names=data.class_names)
    return save_model(model, path, meta, force=True)


def recipe(arch: str, epochs: int) -> list:
    # MobileNetV3 is depthwise-separable already (swap would say "no convolution to swap"),
    # so its swap step is the activation one: ReLU -> ReLU6, the quantization-friendly form.
    swap = (SwapConfig(conv="none", act="relu6") if arch.startswith("mobilenet")
            else SwapConfig(conv="depthwise-separable"))
    return [swap, PruneConfig(ratio=0.4), DistillConfig(epochs=epochs),
            QuantizeConfig(mode="static")]


def rows_for(arch: str, result) -> list[list]:
    steps = result.steps
    base = steps[0].record
    # the input's fastest fp32 runtime: eager torch or its fp32 export in ONNX Runtime
    fastest = min(r["latency_ms_median"] for r in [base, *result.baselines])
    out = []
    for s in steps:
        r = s.record
        out.append([arch, s.label, r["runtime"], r["params"], round(r["file_bytes"] / 1024, 1),
                    r["macs"], round(r["latency_ms_median"], 3), round(r["accuracy"], 2),
                    f"{base['file_bytes'] / r['file_bytes']:.2f}x",
                    f"{base['macs'] / r['macs']:.2f}x" if r["macs"] else "-",
                    f"{base['latency_ms_median'] / r['latency_ms_median']:.2f}x",
                    f"{fastest / r['latency_ms_median']:.2f}x",
                    f"{r['accuracy'] - base['accuracy']:+.2f}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8, help="training and distillation epochs")
    ap.add_argument("--size", type=int, default=32, help="digits resized to SIZE x SIZE")
    ap.add_argument("--threads", type=int, default=1, help="latency threads")
    args = ap.parse_args()
    data = load_data("digits", size=(args.size, args.size))
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in MODELS:
            base = train(arch, data, args.epochs, Path(tmp) / f"{arch}.pt")
            result = run_pipeline(
                load_model(base), recipe(arch, args.epochs), Path(tmp) / f"{arch}-slim.onnx",
                data=data, threads=args.threads,
                hooks=Hooks(stage=lambda t, a=arch: print(f"  {a}: {t}")))
            table += rows_for(arch, result)
    print()
    print(tabulate(table, headers=["model", "step", "runtime", "params", "file KB", "MACs",
                                   "ms b1", "top-1 %", "x smaller", "x fewer MACs",
                                   "x faster vs fp32 torch", "x faster vs fastest fp32",
                                   "Δ top-1"], tablefmt="github"))
    print(f"\ndigits at {args.size}x{args.size}, latency batch 1, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
