"""fp32 vs quantized: latency per runtime, file size and accuracy, all measured in one run.

    python examples/bench_quantize.py [--epochs 6] [--seq-epochs 6] [--threads 2] [--torchao]
                                      [--openvino]

Static int8 (ONNX Runtime QDQ) on the residual reference CNN and the seed's PDModel, trained
briefly on digits at the seed's 1x60x120 size; dynamic int8 on the LSTM and transformer
reference models (digits rows). Each quantized row is compared with fp32 on the same runtime
and with the fastest fp32 runtime. ``--torchao`` adds torchao PT2E + torch.compile (if
installed) to show why it is not the default: fast, but its artifact needs a compile at load.
``--openvino`` runs the same fp32 and int8 ONNX files in OpenVINO (if installed), the other
CPU int8 runtime, so the route choice rests on measurements of both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from torchslim.compress.data import load_data
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.compress.quantize import QuantizeConfig, compare, quantize_model, rate_speedups
from torchslim.compress.train import TrainConfig, fit
from torchslim.models.registry import create_model

CASES = [  # (registry name, mode, image size)
    ("resnet_small", "static", (60, 120)),
    ("pd_model", "static", (60, 120)),
    ("lstm", "dynamic", (8, 8)),
    ("transformer", "dynamic", (8, 8)),
]


def train(arch: str, data, epochs: int):
    c, h, w = data.input_shape
    torch.manual_seed(0)
    model = create_model(arch, num_classes=data.num_classes, in_channels=c, input_size=(h, w))
    t = time.perf_counter()
    fit(model, data, TrainConfig(epochs=epochs))
    print(f"trained {arch} {c}x{h}x{w} for {epochs} epochs in {time.perf_counter() - t:.0f} s")
    return model.eval()


def run_case(arch, mode, size, args, tmp: Path) -> list[list]:
    data = load_data("digits", size=size, seed=0)
    epochs = args.epochs if mode == "static" else args.seq_epochs
    cached = Path(args.cache) / f"{arch}-{epochs}ep.pt" if args.cache else None
    if cached is not None and cached.exists():  # re-runs measure without re-training
        model = load_model(cached).model
    else:
        model = train(arch, data, epochs)
        if cached is not None:
            save_model(model, cached, ModelMeta(input_shape=data.input_shape))
    fp32_pt = save_model(model, tmp / f"{arch}.pt", ModelMeta(input_shape=data.input_shape))
    res = quantize_model(model, QuantizeConfig(mode=mode), data=data, meta=ModelMeta(),
                         out_path=tmp / f"{arch}-{mode}.onnx",
                         keep_fp32_onnx=tmp / f"{arch}-fp32.onnx")
    rows = compare(load_model(fp32_pt), res, data=data, threads=args.threads, batch_size=32)
    if args.torchao and mode == "static":
        rows.append(torchao_row(model, data, args.threads))
    if args.openvino:
        rows += openvino_rows(tmp / f"{arch}-fp32.onnx", res.path, data, args.threads)
    rate_speedups(rows)  # again, now over every runtime's fp32 row
    fp32_file = min(r["file_bytes"] for r in rows if r["precision"] == "fp32")
    out = []
    for r in rows:
        size_pct = 100 * r["file_bytes"] / fp32_file if r.get("file_bytes") else None
        out.append([arch, r["model"], r["runtime"], r.get("file_bytes"), size_pct,
                    r["latency_ms_median"], r.get("batch_latency_ms_median"), r["accuracy"],
                    r["speedup_vs_fp32_same_runtime"], r["speedup_vs_fastest_fp32"]])
    print(f"  fp32 fallback: {', '.join(res.fallbacks) or 'none'}; int8 kernels: "
          f"{res.int8_ops}")
    return out


def openvino_rows(fp32_onnx: Path, int8_onnx: Path, data, threads: int) -> list[dict]:
    """The same two ONNX files run by OpenVINO (if installed): the other int8 CPU runtime.

    OpenVINO runs "fp32" models in bf16 on CPUs with AVX-512 BF16 unless told otherwise, so
    the fp32 row forces f32 and a third row shows its default (bf16) for what it is.
    """
    import numpy as np
    import openvino as ov

    from torchslim.compress.measure import accuracy, measure_latency

    core = ov.Core()
    x = np.zeros((1, *data.input_shape), np.float32)
    rows = []
    for label, path, hint, precision in [("fp32 openvino (f32)", fp32_onnx, "f32", "fp32"),
                                         ("fp32 openvino (default: bf16)", fp32_onnx, None,
                                          "bf16"),
                                         ("static int8 openvino", int8_onnx, None, "int8")]:
        cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint:
            cfg["INFERENCE_PRECISION_HINT"] = hint
        req = core.compile_model(str(path), "CPU", cfg).create_infer_request()

        def run(a, req=req):
            return req.infer({0: a})[0]

        lat = measure_latency(run, x, threads=threads)
        top1 = accuracy(lambda t, run=run: torch.from_numpy(run(t.numpy()).copy()),
                        data.val, 1)[0]
        rows.append({"model": label, "runtime": "openvino", "precision": precision,
                     "file_bytes": path.stat().st_size, "latency_ms_median": lat.median_ms,
                     "batch_latency_ms_median": None, "accuracy": top1})
    return rows


def torchao_row(model, data, threads: int) -> dict:
    """torchao PT2E + X86InductorQuantizer + torch.compile: measured, not shipped."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from torchslim.compress.measure import accuracy, measure_latency

    torch.set_num_threads(threads)
    example = torch.zeros(1, *data.input_shape)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    for x in data.train.tensors[0][:128].split(1):  # the exported graph fixes batch 1
        prepared(x)
    converted = convert_pt2e(prepared)
    torch._inductor.config.freezing = True  # int8 weights pre-packed: needed for the speed
    t = time.perf_counter()
    with torch.no_grad():
        compiled = torch.compile(converted)
        compiled(example)
    compile_s = time.perf_counter() - t
    lat = measure_latency(compiled, example, threads=threads)
    top1 = accuracy(lambda x: compiled(x), data.val, 1)[0]  # batch 1, as compiled
    return {"model": f"torchao int8 + compile ({compile_s:.0f} s compile)", "runtime": "torch",
            "precision": "int8", "file_bytes": None, "latency_ms_median": lat.median_ms,
            "batch_latency_ms_median": None, "accuracy": top1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seq-epochs", type=int, default=6, help="LSTM/transformer epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated registry names to run")
    parser.add_argument("--torchao", action="store_true",
                        help="add torchao PT2E + torch.compile int8 (needs torchao)")
    parser.add_argument("--openvino", action="store_true",
                        help="add OpenVINO fp32 / bf16 / int8 on the same ONNX files")
    parser.add_argument("--cache", help="folder to keep trained fp32 models between runs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, mode, size in CASES:
            if args.only and arch not in args.only.split(","):
                continue
            rows += run_case(arch, mode, size, args, Path(tmp))
    headers = ["arch", "row", "runtime", "file B", "% of fp32 file", "ms b1", "ms b32",
               "top-1 %", "x vs fp32 same rt", "x vs fastest fp32"]
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt=".2f"))
    print(f"threads {args.threads}, torch {torch.__version__}, batch-1 median latency "
          "(torch.utils.benchmark via torchslim.compress.measure)")


if __name__ == "__main__":
    main()
