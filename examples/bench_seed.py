"""Reproduce the seed's comparison on real data (digits resized to the PD sensor's 1x60x120).

Part 1 - the seed's table: PDModel baseline, PDLightModel trained alone (the seed's approach),
PDLightModel distilled from PDModel, and PDModel swapped to depthwise-separable convs
(SVD init refitted on 128 training images) then distilled from the original. Every number is
measured: accuracy on the validation split, file size of the saved torchslim .pt, params,
MACs (one forward pass) and CPU latency at batch 1.

Part 2 - distillation vs training alone with the same budget (epochs, lr, batches) on a
reduced training set (300 images, like the seed's <500), averaged over seeds; the teacher
is trained on the same 300 images, so it knows nothing the students could not see. The
default teacher is the residual CNN: on 300 images PDModel is a weaker model than its own
student (measured: 84.6 % after 30 epochs, 96.2 % after 100, against PDLightModel's ~97.5 %
alone), and a teacher below its student only teaches it mistakes (``--teacher pd_model``
shows it). ``--val-fraction 0.5`` scores on ~900 held-out images (one image = 0.1 pt).

    python examples/bench_seed.py                  # both parts (about 15-30 min on 2 cores)
    python examples/bench_seed.py --part 2 --seeds 0 1 2 3 4 --val-fraction 0.5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from torchslim.compress.data import load_data
from torchslim.compress.distill import DistillConfig, distill
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.measure import measure
from torchslim.compress.swap import SwapConfig, swap_model
from torchslim.compress.train import TrainConfig, fit
from torchslim.models.registry import create_model


def build(name: str, data, seed: int):
    c, h, w = data.input_shape
    torch.manual_seed(seed)
    return create_model(name, num_classes=data.num_classes, in_channels=c, input_size=(h, w))


def train_alone(name, data, epochs, lr, seed):
    model = build(name, data, seed)
    result = fit(model, data, TrainConfig(epochs=epochs, lr=lr, seed=seed))
    return model, result.best_top1


KD = {}  # temperature / alpha overrides from the command line


def distilled(teacher, student, data, epochs, lr, seed):
    cfg = DistillConfig(epochs=epochs, lr=lr, seed=seed, **KD)
    _, result = distill(teacher, student, data, cfg)
    return student, result.best_top1


def row(label, model, data, workdir: Path, threads: int) -> dict:
    path = workdir / f"{label.split()[0].lower()}-{abs(hash(label)) % 10_000}.pt"
    save_model(model.eval(), path, ModelMeta(input_shape=data.input_shape,
                                             class_names=data.class_names))
    m = measure(load_model(path), name=label, data=data, threads=threads, batch_size=32)
    return {"model": label, "top-1 %": round(m.accuracy, 2), "file KB": round(m.file_bytes / 1024),
            "params": m.params, "MACs (M)": round(m.macs / 1e6, 2),
            "ms b1": round(m.latency_ms_median, 3), "ms b32": round(m.batch_latency_ms_median, 2)}


def part1(args) -> None:
    size = tuple(int(v) for v in args.size.split(","))
    data = load_data("digits", size=size, seed=0)
    print(f"part 1: {data.describe()}; {args.epochs} epochs each (swap recovery "
          f"{args.swap_epochs}), latency with {args.threads} thread(s)", flush=True)
    t0 = time.time()
    teacher, _ = train_alone("pd_model", data, args.epochs, args.lr, 0)
    print(f"  PDModel trained ({time.time() - t0:.0f} s)", flush=True)
    light, _ = train_alone("pd_light", data, args.epochs, args.lr, 0)
    print(f"  PDLightModel alone trained ({time.time() - t0:.0f} s)", flush=True)
    light_kd, _ = distilled(teacher, build("pd_light", data, 0), data, args.epochs, args.lr, 0)
    print(f"  PDLightModel distilled ({time.time() - t0:.0f} s)", flush=True)
    calib = data.train.tensors[0][:128]
    swapped, report = swap_model(teacher, SwapConfig(), calib)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row("PDModel (baseline)", teacher, data, Path(tmp), args.threads)]
        rows.append(row("PDModel swapped, before KD", swapped, data, Path(tmp), args.threads))
        swapped, _ = distilled(teacher, swapped, data, args.swap_epochs, args.swap_lr, 0)
        print(f"  swapped PDModel distilled ({time.time() - t0:.0f} s)", flush=True)
        rows += [
            row("PDLightModel alone", light, data, Path(tmp), args.threads),
            row("PDLightModel distilled", light_kd, data, Path(tmp), args.threads),
            row("PDModel swapped+distilled", swapped, data, Path(tmp), args.threads),
        ]
    base = rows[0]
    for r in rows:
        r["x smaller"] = round(base["file KB"] / r["file KB"], 2)
        r["x fewer MACs"] = round(base["MACs (M)"] / r["MACs (M)"], 2)
        r["Δ top-1"] = round(r["top-1 %"] - base["top-1 %"], 2)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print("\nswapped layers (weight error of the plain SVD, output error after the refit):")
    print(tabulate([[x.name, x.before, x.params_before, x.params_after, f"{x.rel_error:.3f}",
                     f"{x.out_error:.3f}"] for x in report.layers],
                   headers=["layer", "before", "params", "after", "weight err", "out err"],
                   tablefmt="github"))


def part2(args) -> None:
    size = tuple(int(v) for v in args.small_size.split(","))
    data = load_data("digits", size=size, seed=0, train_limit=args.train_images,
                     val_fraction=args.val_fraction)
    budget = dict(epochs=args.small_epochs, lr=args.lr)
    print(f"\npart 2: {data.describe()}; student PDLightModel, {args.small_epochs} epochs at "
          f"lr {args.lr} for every student run", flush=True)
    # "same": the teacher sees only the students' images; "full": it was trained on the whole
    # training split (a model built on more data teaching a small one that sees few images).
    t_data = data if args.teacher_data == "same" else load_data(
        "digits", size=size, seed=0, val_fraction=args.val_fraction)
    teacher, t_acc = train_alone(args.teacher, t_data, args.teacher_epochs, args.lr, 0)
    print(f"  teacher {args.teacher} on {len(t_data.train)} images, {args.teacher_epochs} "
          f"epochs: {t_acc:.2f} %", flush=True)
    rows = []
    for seed in args.seeds:
        _, alone = train_alone("pd_light", data, seed=seed, **budget)
        _, kd = distilled(teacher, build("pd_light", data, seed), data, seed=seed, **budget)
        rows.append([seed, round(alone, 2), round(kd, 2), round(kd - alone, 2)])
        print(f"  seed {seed}: alone {alone:.2f} %, distilled {kd:.2f} %", flush=True)
    mean_alone = statistics.mean(r[1] for r in rows)
    mean_kd = statistics.mean(r[2] for r in rows)
    rows.append(["mean", round(mean_alone, 2), round(mean_kd, 2), round(mean_kd - mean_alone, 2)])
    print(tabulate(rows, headers=["seed", "alone top-1 %", "distilled top-1 %", "gain"],
                   tablefmt="github"))
    print(f"teacher ({args.teacher} on {len(t_data.train)} images): {t_acc:.2f} %; "
          f"KD temperature {KD['temperature']}, alpha {KD['alpha']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", type=int, choices=(0, 1, 2), default=0, help="0 = both")
    p.add_argument("--size", default="60,120", help="part 1 input H,W (the seed's 60,120)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--swap-epochs", type=int, default=6)
    p.add_argument("--swap-lr", type=float, default=1e-3)  # the swap starts close: go gently
    p.add_argument("--small-size", default="30,60", help="part 2 input H,W (smaller: 3 seeds)")
    p.add_argument("--small-epochs", type=int, default=30)
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="part 2 held-out share (0.5: ~900 images, so one image is 0.1 pt)")
    p.add_argument("--teacher-data", choices=("same", "full"), default="same",
                   help="part 2 teacher trained on the students' images or the full split")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--teacher", default="resnet_small",
                   help="part 2 teacher architecture (registry name)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7)
    args = p.parse_args()
    KD.update(temperature=args.temperature, alpha=args.alpha)
    torch.set_num_threads(args.threads)
    if args.part in (0, 1):
        part1(args)
    if args.part in (0, 2):
        part2(args)


if __name__ == "__main__":
    main()
