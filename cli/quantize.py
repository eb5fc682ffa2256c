"""`torchslim quantize`: int8 that really runs int8 (ONNX Runtime), or smaller torch weights."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from tabulate import tabulate

from ..compress.data import check_classes
from ..compress.device import TrainDevice
from ..compress.errors import UsageError
from ..compress.inputs import call
from ..compress.io import LoadOptions, check_output
from ..compress.quantize import CALIBRATIONS, MODES, QuantizeConfig, compare, quantize_model
from .common import (
    ChannelsOpt,
    DataOpt,
    ForceOpt,
    FormatOpt,
    ImageSizeOpt,
    OutOpt,
    SeedOpt,
    ThreadsOpt,
    check_format,
    command,
    example_inputs,
    input_spec,
    model_options,
    open_data,
    open_model,
    stderr_console,
    stdout_console,
    train_options,
)
from .render import Table, fmt_bytes, fmt_count, fmt_ms, fmt_pct

EPILOG = (
    "Examples:\n\n"
    "  torchslim quantize pd.pt --mode static --data digits -o pd-int8.onnx\n\n"
    "  torchslim quantize lstm.pt --mode dynamic -o lstm-int8.onnx\n\n"
    "  torchslim quantize pd.pt --mode bf16 -o pd-bf16.pt\n\n"
    "static/dynamic/qat write an ONNX file run by ONNX Runtime with int8 kernels; "
    "weight-only/fp16/bf16 write a torchslim .pt. `torchslim report` reads both."
)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


COLUMNS = [
    ("model", "model", str),
    ("runtime", "runtime", str),
    ("params", "params", fmt_count),
    ("file_bytes", "file", fmt_bytes),
    ("macs", "MACs", fmt_count),
    ("latency_ms_median", "ms b1", fmt_ms),
    ("batch_latency_ms_median", "ms bN", fmt_ms),
    ("accuracy", "top-1 %", fmt_pct),
    ("speedup_vs_fp32_same_runtime", "vs fp32 same rt", _x),
    ("speedup_vs_fastest_fp32", "vs fastest fp32", _x),
]


def _render(rows: list[dict], fmt: str) -> None:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    body = [[f(r.get(k)) for k, _, f in cols] for r in rows]
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
    elif fmt in ("markdown", "csv"):
        tablefmt = "github" if fmt == "markdown" else "tsv"
        typer.echo(tabulate(body, headers=[h for _, h, _ in cols], tablefmt=tablefmt))
    else:
        table = Table(title="torchslim quantize", header_style="bold cyan")
        for i, (_, h, _) in enumerate(cols):
            table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i == 0)
        for line in body:
            table.add_row(*line)
        stdout_console.print(table)


def _summary(res, fmt: str, compared: bool) -> None:
    if fmt == "json":
        if not compared:  # the comparison rows are the JSON otherwise; never print nothing
            import json

            typer.echo(json.dumps({
                "output": str(res.path), "mode": res.mode, "runtime": res.runtime,
                "int8_ops": res.int8_ops, "fallbacks": res.fallbacks, "notes": res.notes,
                "accuracy_before": res.accuracy_before, "accuracy_after": res.accuracy_after,
            }, indent=2))
        return
    lines = [f"wrote {res.path} ({res.mode}, runs on {res.runtime})"]
    if res.int8_ops:
        lines.append("int8 kernels: " + ", ".join(f"{k} x{v}" for k, v in res.int8_ops.items()))
    lines.append("fp32 fallback: " + (", ".join(res.fallbacks) if res.fallbacks else "none"))
    lines += [f"note: {n}" for n in res.notes]
    for line in lines:
        typer.echo(line)


def register(app: typer.Typer) -> None:
    @command(app, "quantize", epilog=EPILOG)
    @model_options
    @train_options
    def quantize_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model to quantize.")],
        output: OutOpt,
        mode: Annotated[str, typer.Option(help=f"{' | '.join(MODES)}.")] = "static",
        backend: Annotated[str, typer.Option(
            help="auto | onnxruntime (static, dynamic, qat) | torch (weight-only, fp16, bf16)."
        )] = "auto",
        data: DataOpt = None,
        calib_batches: Annotated[int, typer.Option(
            help="Calibration batches (of 32 training samples) for static/qat.")] = 8,
        calibrate: Annotated[str, typer.Option(
            help=f"Activation range method: {' | '.join(CALIBRATIONS)}.")] = "minmax",
        reduce_range: Annotated[str, typer.Option(
            help="auto | on | off: 7-bit int8 weights. auto = on where this CPU has no VNNI "
            "(its int8 kernels saturate at full range).")] = "auto",
        per_channel: Annotated[bool, typer.Option(
            "--per-channel/--per-tensor", help="Weight scales per output channel.")] = True,
        exclude: Annotated[list[str] | None, typer.Option(
            help="ONNX node name to keep in fp32 (repeatable).")] = None,
        qat_epochs: Annotated[int, typer.Option(help="Fake-quant fine-tune epochs (qat).")] = 3,
        qat_lr: Annotated[float, typer.Option(help="Fine-tune learning rate (qat).")] = 5e-4,
        equalize: Annotated[bool, typer.Option(
            "--equalize/--no-equalize",
            help="static/qat: balance depthwise -> pointwise pairs before int8 (outputs "
                 "unchanged; swapped models lose far less).")] = True,
        keep_output: Annotated[bool, typer.Option(
            "--keep-output-fp32/--int8-output",
            help="static/qat: keep the layer that computes the output (logits) in fp32.")]
        = True,
        compare_runtimes: Annotated[bool, typer.Option(
            "--compare/--no-compare",
            help="Measure fp32 torch, fp32 ONNX Runtime and the result in one run.")] = True,
        threads: ThreadsOpt = None,
        batch_size: Annotated[int, typer.Option(help="Larger batch for latency.")] = 32,
        fmt: FormatOpt = "table",
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        diagnose: Annotated[bool, typer.Option(
            "--diagnose", help="static: print each layer's int8 error against fp32 (SQNR, "
            "relative error, noise the layer adds).")] = False,
        keep_fp32: Annotated[int, typer.Option(
            help="static: keep the N layers that add the most int8 noise in fp32.")] = 0,
        load: LoadOptions = None,
        accel: TrainDevice = None,
    ) -> None:
        """Quantize a model to int8 / fp16 / bf16 and compare it with fp32 on every runtime."""
        check_format(fmt)
        cfg = QuantizeConfig(
            mode=mode, backend=backend, calib_batches=calib_batches, per_channel=per_channel,
            calibrate=calibrate, exclude=tuple(exclude or ()), qat_epochs=qat_epochs,
            qat_lr=qat_lr, reduce_range=reduce_range, seed=seed, equalize=equalize,
            keep_output_fp32=keep_output, **accel.train_kwargs(),
        )
        if Path(output).suffix.lower() != cfg.suffix:
            raise UsageError(f"mode {cfg.mode} writes a {cfg.suffix} file; name -o like "
                             f"model{cfg.suffix}")
        check_output(output, force=force, inputs=[model_path])
        loaded = open_model(model_path, load)
        split = None
        if data:
            split = open_data(data, image_size=image_size, channels=channels, seed=seed,
                              like=loaded)
        if diagnose or keep_fp32:
            cfg = _diagnosed(cfg, loaded, split, keep_fp32)
        with tempfile.TemporaryDirectory(prefix="torchslim-quantize-") as tmp:
            keep = Path(tmp) / "fp32.onnx" if compare_runtimes and cfg.suffix == ".onnx" else None
            with stderr_console.status(f"quantizing ({cfg.mode}, {cfg.runtime})..."):
                if split is not None and loaded.model is not None:
                    _check_data(loaded, split)
                res = quantize_model(loaded, cfg, out_path=output, data=split, force=force,
                                     inputs=load.inputs, keep_fp32_onnx=keep)
            if compare_runtimes:
                with stderr_console.status("measuring fp32 and quantized on each runtime..."):
                    rows = compare(loaded, res, data=split, threads=threads,
                                   batch_size=batch_size)
                _render(rows, fmt)
        _summary(res, fmt, compare_runtimes)


def _diagnosed(cfg: QuantizeConfig, loaded, split, keep: int) -> QuantizeConfig:
    """Per-layer int8 error (printed), and the ``keep`` noisiest layers added to exclude."""
    import dataclasses

    from ..compress.errors import UsageError
    from ..compress.io import require_module
    from ..compress.quantize import diagnose
    from .goal import show_diagnosis

    if cfg.mode != "static" or split is None:
        raise UsageError("--diagnose and --keep-fp32 need --mode static and --data")
    module = require_module(loaded, "quantize")
    with stderr_console.status("measuring each layer's int8 error..."):
        diag = diagnose(module, cfg, input_spec(loaded, split), split.train)
    worst = diag.worst(keep)
    show_diagnosis({**diag.to_dict(), "kept_fp32": worst})
    return dataclasses.replace(cfg, exclude=tuple(dict.fromkeys([*cfg.exclude, *worst])))


def _check_data(loaded, split) -> None:
    import torch

    with torch.no_grad():
        out = call(loaded.model.eval(), example_inputs(loaded, split))
    check_classes(out.shape[-1], split)
