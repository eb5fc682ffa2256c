"""Can `report`'s numbers be trusted? Its latency median against independent timers, and its
per-layer profile against the whole model, on PDModel and its static int8 ONNX file.

    python examples/bench_report_timing.py [--pt pd.pt --onnx pd-int8.onnx] [--threads 1]
                                           [--min-time 1] [--rounds 3]

For each subject (the .pt in eager torch, the .pt in ONNX Runtime through report's fp32
export, the int8 file in ONNX Runtime), in one process at one thread count, in ``--rounds``
interleaved rounds (report, then the independent timer, then again), the figures being the
medians over the rounds, so a machine whose speed drifts from second to second moves both:

- report's batch-1 median (what `torchslim report --runtime all` prints), against an
  independent ``torch.utils.benchmark.Timer.blocked_autorange`` (torch) or a plain
  ``session.run`` loop timed with ``perf_counter`` (ONNX Runtime): within 15 % passes;
- report's per-layer profile (``--layers``): the layers' sum against the same median (within
  10 % passes) and the MACs column's sum against the model's MACs (must be equal).

Without --pt/--onnx it builds them: PDModel at 1x60x120 (seed 0, untrained: timing does not
depend on the weights' values) and its static int8 quantization calibrated on digits. Run it
on a quiet machine: the CV column says how steady each timing was.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from torchslim.compress.baselines import fp32_onnx, measure_runtimes
from torchslim.compress.data import load_data
from torchslim.compress.hw import environment
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.measure_onnx import OnnxSubject
from torchslim.compress.quantize import QuantizeConfig, quantize_model
from torchslim.models.registry import create_model

SHAPE = (1, 60, 120)


def build(tmp: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = create_model("pd_model", num_classes=10, in_channels=1, input_size=SHAPE[1:])
    pt = save_model(model.eval(), tmp / "pd.pt", ModelMeta(input_shape=SHAPE))
    data = load_data("digits", size=SHAPE[1:], seed=0)
    q = quantize_model(load_model(pt), QuantizeConfig(mode="static"), data=data,
                       out_path=tmp / "pd-int8.onnx")
    return pt, q.path


def torch_benchmark_ms(model, threads: int, min_time: float) -> float:
    from torch.utils import benchmark

    x = torch.randn(1, *SHAPE)
    timer = benchmark.Timer("m(x)", globals={"m": model.eval(), "x": x}, num_threads=threads)
    with torch.inference_mode():
        return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def ort_loop_ms(path: Path, threads: int, min_time: float) -> float:
    subject = OnnxSubject(path, threads)  # the same session options as report's
    feed = subject.prepare((torch.randn(1, *SHAPE),))
    for _ in range(5):
        subject.timed(feed)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 10:
        t = time.perf_counter()
        subject.timed(feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def check(recs: list, independent: list[float]) -> list:
    """One table row from the rounds: medians of report's figures and of the timer's."""
    rec = recs[0]
    ours = float(np.median([r.latency_ms_median for r in recs]))
    theirs = float(np.median(independent))
    ratio = ours / theirs
    coverage = float(np.median([r.layers["coverage"] for r in recs]))
    layers_ms = float(np.median([r.layers["total_ms"] for r in recs]))
    cv = float(np.median([r.latency_cv or 0 for r in recs]))
    macs = {r.layers["macs_total"] for r in recs}
    return [rec.model, rec.runtime, f"{ours:.4f}", f"{theirs:.4f}", f"{ratio:.3f}",
            "yes" if abs(ratio - 1) <= 0.15 else "NO", f"{100 * cv:.1f}", f"{layers_ms:.4f}",
            f"{100 * coverage:.1f}", "yes" if abs(coverage - 1) <= 0.10 else "NO",
            f"{rec.layers['macs_total']:,}", "yes" if macs == {rec.macs} else "NO"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pt", type=Path)
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timing")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pt, q = (args.pt, args.onnx) if args.pt and args.onnx else build(Path(tmp))
        kw = {"threads": args.threads, "min_run_time": args.min_time, "layers": True,
              "inputs": SHAPE}
        loaded = load_model(pt)
        subjects = {  # name: (report's records for it, the independent timer)
            "torch": (lambda: measure_runtimes(loaded, "torch", name=pt.name, **kw)[0],
                      lambda: torch_benchmark_ms(loaded.model, args.threads, args.min_time)),
            "fp32 ort": (lambda: measure_runtimes(loaded, "onnxruntime", name=pt.name, **kw)[0],
                         lambda: ort_loop_ms(exported, args.threads, args.min_time)),
            "int8 ort": (lambda: measure_runtimes(load_model(q), name=q.name, **kw)[0],
                         lambda: ort_loop_ms(q, args.threads, args.min_time)),
        }
        results = {k: ([], []) for k in subjects}
        with fp32_onnx(loaded, SHAPE) as exported:  # the very file report measures
            for _ in range(args.rounds):
                for key, (ours, theirs) in subjects.items():
                    results[key][0].append(ours())
                    results[key][1].append(theirs())
        rows = [check(*results[k]) for k in subjects]
    env = environment(args.threads)
    print(f"{env['cpu']}, {args.threads} thread(s), torch {env['torch']}, onnxruntime "
          f"{env['onnxruntime']}, {args.min_time} s per timing, median of {args.rounds} "
          "interleaved rounds\n")
    print(tabulate(rows, headers=[
        "model", "runtime", "report median ms", "independent ms", "ratio", "within 15 %",
        "CV %", "layers sum ms", "layers / median %", "within 10 %", "MACs column sum",
        "= model MACs"], tablefmt="github"))
    print("\nindependent: torch.utils.benchmark blocked_autorange (torch), a perf_counter "
          "loop over session.run with report's session options (onnxruntime)")


if __name__ == "__main__":
    main()
