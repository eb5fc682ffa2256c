"""Benchmark: does structured pruning keep accuracy, and does it buy real CPU speed?

Trains the residual reference CNN (``resnet_small``) and the seed's PDModel on the real
digits images (resized, since PDModel's four pooling stages need at least 16x16), then
for channel ratios 0.25 / 0.5 / 0.75 and MAC targets 0.5 / 0.25 prunes a copy, fine-tunes
it (distilling from the unpruned model) and measures accuracy, parameters, MACs and
batch-1 CPU latency. Every number printed is measured in this run.

Latency at batch 1 on tiny inputs is dominated by per-op overhead, so the speed-up is
also measured at a compute-bound input size (``--latency-size``, default the seed's PD
sensor images, 60x120), which the fully convolutional ResNet accepts unchanged.

    python examples/bench_prune.py                   # full run (~20-30 min on 2 busy cores)
    python examples/bench_prune.py --quick           # smoke run, numbers not meaningful
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from torchslim.compress.data import load_data
from torchslim.compress.errors import TorchslimError
from torchslim.compress.measure import count_macs, count_params, environment, measure_latency
from torchslim.compress.onnx_quant import INPUT, export_onnx, session
from torchslim.compress.prune import PruneConfig, prune_model
from torchslim.compress.train import TrainConfig, evaluate, fit
from torchslim.models.registry import create_model

CONFIGS = [
    ("ratio 0.25", PruneConfig(ratio=0.25)),
    ("ratio 0.5", PruneConfig(ratio=0.5)),
    ("ratio 0.75", PruneConfig(ratio=0.75)),
    ("target-macs 0.5", PruneConfig(target_macs=0.5)),
    ("target-macs 0.25", PruneConfig(target_macs=0.25)),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet_small,pd_model")
    p.add_argument("--size", type=int, default=16, help="train/eval on digits resized to SxS")
    p.add_argument("--epochs", type=int, default=15, help="baseline training epochs")
    p.add_argument("--ft-epochs", type=int, default=8, help="fine-tuning epochs per pruned model")
    p.add_argument("--rounds", type=int, default=3, help="latency rounds (min of medians)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft-lr", type=float, default=2e-3)
    p.add_argument("--latency-size", default="60,120", help="H,W for the compute-bound timing")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    p.add_argument("--no-distill", action="store_true", help="fine-tune with labels only")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep channel counts multiples of N (CPU kernels like multiples of 8)")
    p.add_argument("--configs", default=",".join(label for label, _ in CONFIGS),
                   help="which of the prune settings to run (comma-separated labels)")
    p.add_argument("--speed-only", metavar="MODEL",
                   help="skip training: time MODEL (untrained; weights do not change speed) "
                   "pruned by each setting, at --latency-size")
    p.add_argument("--speed-width", type=float, default=4.0,
                   help="width multiplier for --speed-only (4: 64-512 channels, ResNet-18 widths)")
    p.add_argument("--json", help="also write all rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="1 epoch everywhere (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.ft_epochs = 1, 1
    return args


def latency(model, shape, threads) -> float:
    x = torch.randn(1, *shape)
    return measure_latency(model.eval(), x, threads=threads, min_run_time=1.0).median_ms


_SESSIONS: dict[tuple[int, tuple], object] = {}


def ort_latency(model, shape, threads) -> float:
    """The same model exported to ONNX and run by ONNX Runtime, the fastest fp32 CPU runtime
    measured here (README, "Quantization"): a pruned model is deployed there, not eagerly."""
    key = (id(model), tuple(shape))
    if key not in _SESSIONS:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model.eval(), shape, Path(tmp) / "m.onnx")
            _SESSIONS[key] = session(path, threads)
    sess = _SESSIONS[key]
    x = torch.randn(1, *shape).numpy()
    return measure_latency(lambda a: sess.run(None, {INPUT: a}), x, threads=threads,
                           min_run_time=1.0).median_ms


def measure_row(name, label, model, data, shape, big_shape, extra=None) -> dict:
    row = {
        "model": name,
        "config": label,
        "top1": evaluate(model, data.val)[0],
        "params": count_params(model)[0],
        "macs": count_macs(model, torch.zeros(1, *shape)),
        "_model": model,
        "_shapes": (shape, big_shape),
    }
    if big_shape is not None:
        row["macs_big"] = count_macs(model, torch.zeros(1, *big_shape))
    row.update(extra or {})
    return row


def measure_latencies(rows: list[dict], threads: int, rounds: int) -> None:
    """Time every model in turn, ``rounds`` times, keeping each one's fastest median: the
    machine is shared, and interleaving spreads other load evenly over the models."""
    for _ in range(rounds):
        for r in rows:
            shape, big_shape = r["_shapes"]
            r["ms_small"] = min(r.get("ms_small", 1e9), latency(r["_model"], shape, threads))
            if big_shape is not None:
                ms = latency(r["_model"], big_shape, threads)
                r["ms_big"] = min(r.get("ms_big", 1e9), ms)
                ms = ort_latency(r["_model"], big_shape, threads)
                r["ms_big_ort"] = min(r.get("ms_big_ort", 1e9), ms)
    for r in rows:
        del r["_model"], r["_shapes"]


def bench_model(name, args, data, big_hw) -> list[dict]:
    c, h, w = data.input_shape
    shape = (c, h, w)
    # PDModel flattens a fixed-size feature map, so it only runs at its training size.
    big_shape = (c, *big_hw) if name.startswith("resnet") else None
    torch.manual_seed(0)
    base = create_model(name, num_classes=data.num_classes, in_channels=c, input_size=(h, w))
    t0 = time.perf_counter()
    fit(base, data, TrainConfig(epochs=args.epochs, lr=args.lr))
    print(f"[{name}] baseline trained in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = [measure_row(name, "baseline", base, data, shape, big_shape)]
    example = torch.zeros(1, *shape)
    ft = TrainConfig(epochs=args.ft_epochs, lr=args.ft_lr)
    wanted = args.configs.split(",")
    for label, cfg in [(label, cfg) for label, cfg in CONFIGS if label in wanted]:
        if args.round_to:
            cfg = dataclasses.replace(cfg, round_to=args.round_to)
            label = f"{label}, round-to {args.round_to}"
        t0 = time.perf_counter()
        try:
            pruned, rep = prune_model(base, cfg, example, data=data, train_cfg=ft,
                                      distill=not args.no_distill)
        except TorchslimError as exc:  # e.g. a MAC target out of reach with --round-to
            print(f"[{name}] {label}: skipped ({exc})", flush=True)
            continue
        extra = {"channel_ratio": rep.ratio, "top1_before_ft": rep.pruned_top1,
                 "seconds": time.perf_counter() - t0}
        rows.append(measure_row(name, label, pruned, data, shape, big_shape, extra))
        print(f"[{name}] {label}: top-1 {rows[-1]['top1']:.2f} "
              f"(before fine-tune {rep.pruned_top1:.2f})", flush=True)
    return rows


def speed_only(args, big_hw) -> None:
    """Latency vs MACs for one architecture pruned by each setting (no accuracy)."""
    torch.manual_seed(0)
    model = create_model(args.speed_only, input_size=big_hw, width_mult=args.speed_width).eval()
    shape = (1, *big_hw)
    example = torch.zeros(1, *shape)
    rows = [{"config": "unpruned", "model": model}]
    for label, cfg in CONFIGS:
        if args.round_to:
            cfg = dataclasses.replace(cfg, round_to=args.round_to)
        try:
            rows.append({"config": label, "model": prune_model(model, cfg, example)[0]})
        except TorchslimError as exc:  # e.g. round-to would empty a thin layer
            print(f"{label}: skipped ({exc})")
    for r in rows:
        r["params"] = count_params(r["model"])[0]
        r["macs"] = count_macs(r["model"], example)
    for _ in range(args.rounds):
        for r in rows:
            r["ms"] = min(r.get("ms", 1e9), latency(r["model"], shape, args.threads))
            r["ort"] = min(r.get("ort", 1e9), ort_latency(r["model"], shape, args.threads))
    base = rows[0]
    body = [[r["config"], r["params"], r["macs"], base["macs"] / r["macs"], r["ms"],
             base["ms"] / r["ms"], (base["ms"] / r["ms"]) / (base["macs"] / r["macs"]),
             r["ort"], base["ort"] / r["ort"],
             (base["ort"] / r["ort"]) / (base["macs"] / r["macs"])]
            for r in rows]
    env = environment(args.threads)
    print(f"{args.speed_only} x{args.speed_width:g} width, untrained, batch 1 at "
          f"{big_hw[0]}x{big_hw[1]}, {args.threads} thread(s), {env.get('cpu')}, "
          f"round-to {args.round_to}")
    print(tabulate(body, headers=["config", "params", "MACs", "MACs ÷", "torch ms b1",
                                  "speed-up", "speed-up / MACs ÷", "ORT ms b1", "speed-up",
                                  "speed-up / MACs ÷"], tablefmt="github", floatfmt=".3f"))


def add_ratios(rows: list[dict]) -> None:
    base = rows[0]
    for r in rows:
        r["d_top1"] = r["top1"] - base["top1"]
        r["macs_x"] = base["macs"] / r["macs"]
        r["speedup"] = base["ms_small"] / r["ms_small"]
        if "ms_big" in r:
            r["macs_x_big"] = base["macs_big"] / r["macs_big"]
            r["speedup_big"] = base["ms_big"] / r["ms_big"]
            r["eff_big"] = r["speedup_big"] / r["macs_x_big"]
            r["speedup_big_ort"] = base["ms_big_ort"] / r["ms_big_ort"]
            r["eff_big_ort"] = r["speedup_big_ort"] / r["macs_x_big"]


def table(rows: list[dict], size: int, big: str) -> str:
    head = ["model", "config", "ch. ratio", "top-1 %", "Δ top-1", "top-1 pre-FT", "params",
            "MACs", "MACs ÷", f"ms b1 {size}x{size}", "speed-up",
            f"torch ms b1 {big}", "speed-up", "speed-up / MACs ÷",
            f"ORT ms b1 {big}", "speed-up", "speed-up / MACs ÷"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    body = [[r["model"], r["config"], f(r.get("channel_ratio"), ".3f"), f(r["top1"], ".2f"),
             f(r["d_top1"], "+.2f"), f(r.get("top1_before_ft"), ".2f"), r["params"],
             r["macs"], f(r["macs_x"], ".2f"), f(r["ms_small"], ".3f"), f(r["speedup"], ".2f"),
             f(r.get("ms_big"), ".3f"), f(r.get("speedup_big"), ".2f"),
             f(r.get("eff_big"), ".2f"), f(r.get("ms_big_ort"), ".3f"),
             f(r.get("speedup_big_ort"), ".2f"), f(r.get("eff_big_ort"), ".2f")] for r in rows]
    return tabulate(body, headers=head, tablefmt="github")


def main() -> None:
    args = parse_args()
    big_hw = tuple(int(v) for v in args.latency_size.split(","))
    if args.speed_only:
        return speed_only(args, big_hw)
    data = load_data("digits", size=(args.size, args.size), seed=0)
    print(data.describe(), flush=True)
    per_model = [bench_model(name, args, data, big_hw) for name in args.models.split(",")]
    all_rows = [r for rows in per_model for r in rows]
    print("timing batch-1 latency...", flush=True)
    measure_latencies(all_rows, args.threads, args.rounds)
    for rows in per_model:
        add_ratios(rows)
    env = environment(args.threads)
    print()
    print(f"torch {env.get('torch')}, {args.threads} thread(s), CPU: {env.get('cpu')}; "
          f"digits at {args.size}x{args.size}; train {args.epochs} epochs (lr {args.lr}), "
          f"fine-tune {args.ft_epochs} epochs (lr {args.ft_lr}) "
          f"({'labels only' if args.no_distill else 'distilled from the unpruned model'})")
    print(table(all_rows, args.size, "x".join(map(str, big_hw))))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "rows": all_rows}, fh, indent=2)


if __name__ == "__main__":
    main()
