"""`torchslim swap`: standard convs -> depthwise-separable, cheap activations, low-rank Linear."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..compress.artifact import check_model_output, write_model
from ..compress.config import config_to_dict
from ..compress.data import check_classes
from ..compress.device import TrainDevice
from ..compress.distill import DistillConfig, distill
from ..compress.errors import UsageError
from ..compress.inputs import call
from ..compress.io import LoadOptions, history_entry, require_module
from ..compress.measure import count_macs, count_params
from ..compress.swap import SwapConfig, swap_model
from ..compress.train import evaluate
from .common import (
    ChannelsOpt,
    DataOpt,
    ForceOpt,
    ImageSizeOpt,
    OutOpt,
    SeedOpt,
    command,
    fit_progress,
    input_spec,
    model_options,
    open_data,
    open_model,
    stderr_console,
    stdout_console,
    train_options,
)
from .render import Table, fmt_count, fmt_pct, safe_markup

EPILOG = (
    "Examples: torchslim swap pd.pt --data digits --epochs 15 -o pd-sep.pt  "
    "| torchslim swap m.pt --conv none --act hard -o m-hard.pt  "
    "| torchslim swap m.pt --linear low-rank --rank-ratio 0.25 -o m-lr.pt"
)
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table | json")]


def numbers(model: torch.nn.Module, example, split) -> dict:
    """params, MACs and (with data) validation top-1: the history's before/after record."""
    out = {"params": count_params(model)[0], "macs": count_macs(model, example)}
    if split is not None:
        out["accuracy"] = evaluate(model, split.val)[0]
    return out


def _layer_table(report) -> Table:
    table = Table(title="swapped layers", header_style="bold cyan")
    for h in ("layer", "before", "after", "params", "weight err", "output err"):
        table.add_column(h, justify="right" if h in ("params", "weight err", "output err")
                         else "left")
    for layer in report.layers:
        params = (f"{fmt_count(layer.params_before)} -> {fmt_count(layer.params_after)}"
                  if layer.kind != "act" else "-")
        table.add_row(
            layer.name, layer.before, layer.after, params,
            "-" if layer.rel_error is None else f"{layer.rel_error:.3f}",
            "-" if layer.out_error is None else f"{layer.out_error:.3f}",
        )
    return table


def _layer_notes(report) -> list[str]:
    notes = []
    for layer in report.layers:
        errs = ""
        if layer.rel_error is not None:
            errs = f", weight err {layer.rel_error:.4f}"
        if layer.out_error is not None:
            errs += f", output err {layer.out_error:.4f}"
        notes.append(f"{layer.name}: {layer.before} -> {layer.after}{errs}")
    return notes + [f"not swapped (functional): {f}" for f in report.functional] + report.notes


def _recover(teacher, student, split, epochs, lr, batch_size, temperature, alpha, seed,
             accel: TrainDevice):
    cfg = DistillConfig(epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature,
                        alpha=alpha, seed=seed, **accel.train_kwargs())
    with fit_progress("recovering by distillation") as cb:
        _, result = distill(teacher, student, split, cfg, cb)
    return cfg, result


def _print_summary(before: dict, swapped: dict, after: dict | None, output: Path) -> None:
    def line(label, rec):
        acc = f", top-1 {fmt_pct(rec['accuracy'])}%" if "accuracy" in rec else ""
        return f"{label}: {fmt_count(rec['params'])} params, {fmt_count(rec['macs'])} MACs{acc}"

    typer.echo(line("original", before))
    typer.echo(line("swapped ", swapped))
    if after is not None:
        typer.echo(line("distilled", after))
    typer.echo(
        f"{before['params'] / swapped['params']:.2f}x fewer params, "
        f"{before['macs'] / swapped['macs']:.2f}x fewer MACs; saved {output}"
    )


def register(app: typer.Typer) -> None:
    @command(app, "swap", epilog=EPILOG)
    @model_options
    @train_options
    def swap_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file to swap.")],
        output: OutOpt,
        conv: Annotated[str, typer.Option(
            help="depthwise-separable | none: replace standard KxK convs.")] = (
            "depthwise-separable"),
        mid: Annotated[str, typer.Option(
            help="none | bn-act: BatchNorm + ReLU between depthwise and pointwise.")] = "none",
        min_channels: Annotated[int, typer.Option(
            help="Swap only convs with at least N input channels (the stem stays).")] = 4,
        skip: Annotated[list[str] | None, typer.Option(
            help="Module name left as is, e.g. features.3 (repeat).")] = None,
        act: Annotated[str, typer.Option(
            help="none | hard (Sigmoid/SiLU/Tanh/GELU -> hard forms) | relu6 (ReLU -> ReLU6).")
        ] = "none",
        gelu: Annotated[str, typer.Option(
            help="With --act hard, GELU becomes tanh (tanh-approximate GELU) or hardswish.")
        ] = "tanh",
        linear: Annotated[str, typer.Option(
            help="none | low-rank: Linear -> two thin Linears by truncated SVD.")] = "none",
        rank_ratio: Annotated[float, typer.Option(
            help="With --linear low-rank: rank = ratio * min(in, out).")] = 0.25,
        calib_images: Annotated[int, typer.Option(
            help="Training images used to refit the swapped layers (needs --data).")] = 128,
        refit_rounds: Annotated[int, typer.Option(
            help="Alternating least-squares rounds of the refit.")] = 2,
        data: DataOpt = None,
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        epochs: Annotated[int, typer.Option(
            help="Recover by distillation from the original for N epochs (needs --data).")] = 0,
        lr: Annotated[float, typer.Option(help="Distillation peak learning rate.")] = 3e-3,
        batch_size: Annotated[int, typer.Option(help="Distillation batch size.")] = 64,
        temperature: Annotated[float, typer.Option(help="KD temperature.")] = 4.0,
        alpha: Annotated[float, typer.Option(help="KD soft-loss weight.")] = 0.7,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        fmt: FormatOpt = "table",
        load: LoadOptions = None,
        accel: TrainDevice = None,
    ) -> None:
        """Swap standard convolutions for depthwise-separable ones initialised from the original
        weights (SVD, refitted on --data images), optionally recover by distillation."""
        if fmt not in ("table", "json"):
            raise UsageError(f"--format must be table or json, got {fmt!r}")
        if epochs and data is None:
            raise UsageError("--epochs recovers by distillation on data: add --data SPEC")
        cfg = SwapConfig(conv=conv, mid=mid, min_channels=min_channels, skip=tuple(skip or ()),
                         act=act, gelu=gelu, linear=linear, rank_ratio=rank_ratio,
                         refit_rounds=refit_rounds)
        check_model_output(output, force=force, inputs=[model_path])
        loaded = open_model(model_path, load)
        model = require_module(loaded, "swap").eval()
        split = None
        if data is not None:
            split = open_data(data, image_size=image_size, channels=channels, seed=seed,
                              like=loaded)
        spec = input_spec(loaded, split)
        example = spec.example(1)
        if split is not None:
            with torch.no_grad():
                check_classes(call(model, example).shape[-1], split)
        calib = split.head(calib_images) if split is not None else None
        with stderr_console.status("swapping layers..."):
            swapped, report = swap_model(model, cfg, calib)
        before, mid_rec = numbers(model, example, split), numbers(swapped, example, split)
        meta = copy.deepcopy(loaded.meta)
        meta.set_input_spec(spec)
        entry = history_entry("swap", config_to_dict(cfg), before, mid_rec, _layer_notes(report))
        entry["layers"] = report.to_dict()["layers"]  # per-layer errors, machine-readable
        meta.history.append(entry)
        after = None
        if epochs:
            dcfg, result = _recover(model, swapped, split, epochs, lr, batch_size,
                                    temperature, alpha, seed, accel)
            after = numbers(swapped, example, split)
            notes = [f"best epoch {result.best_epoch} of {epochs}", result.timing_note()]
            meta.history.append(history_entry(
                "distill", {**config_to_dict(dcfg), "teacher": str(model_path),
                            "data": split.name}, mid_rec, after, [n for n in notes if n]))
        write_model(swapped, output, meta, force=force, inputs=[model_path])
        if fmt == "json":
            typer.echo(json.dumps({"layers": report.to_dict()["layers"],
                                   "functional": report.functional, "notes": report.notes,
                                   "before": before, "swapped": mid_rec, "distilled": after,
                                   "output": str(output)}, indent=2))
            return
        stdout_console.print(_layer_table(report))
        for note in report.notes + [f"not swapped (functional): {f}" for f in report.functional]:
            stderr_console.print(f"[dim]{safe_markup(note)}[/]")
        _print_summary(before, mid_rec, after, output)
