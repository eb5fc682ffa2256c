"""`torchslim prune` and `torchslim sensitivity`: remove channels for real, or scan first."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..compress import sensitivity as sens
from ..compress.artifact import check_model_output, write_model
from ..compress.config import config_to_dict
from ..compress.data import check_classes
from ..compress.device import TrainDevice
from ..compress.errors import TorchslimError
from ..compress.inputs import call
from ..compress.io import LoadOptions, check_output, history_entry, require_module
from ..compress.prune import IMPORTANCES, PruneConfig, prune_model
from ..compress.train import TrainConfig
from .common import (
    ChannelsOpt,
    DataOpt,
    ForceOpt,
    ImageSizeOpt,
    OutOpt,
    SeedOpt,
    check_format,
    command,
    example_inputs,
    fit_progress,
    input_spec,
    model_options,
    open_data,
    open_model,
    stderr_console,
    stdout_console,
    train_options,
)
from .render import fmt_count, fmt_pct, render_text, rich_table, safe_markup

IgnoreOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--ignore",
        help="Layer name never pruned (repeat, or comma-separate). The final classifier is "
        "always kept.",
    ),
]
ImportanceOpt = Annotated[
    str,
    typer.Option("--importance", help=f"Channel ranking: {' | '.join(IMPORTANCES)}."),
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table | json")]

PRUNE_EPILOG = (
    "Examples: torchslim prune pd.pt --target-macs 0.5 --data digits --epochs 10 -o pd-half.pt  "
    "| torchslim prune m.pt --ratio 0.3 --unstructured -o m-sparse.pt  "
    "| torchslim prune m.pt --from-sensitivity s.json --max-drop 0.5 --data digits -o m-p.pt"
)
SENS_EPILOG = (
    "Example: torchslim sensitivity pd.pt --data digits --ratios 0.1,0.3,0.5,0.7 -o s.json"
)


def _names(values: list[str] | None) -> tuple[str, ...]:
    return tuple(n.strip() for v in values or [] for n in v.split(",") if n.strip())


def _load(path, load, command_name):
    """The file record and its eager module (TorchScript/ONNX cannot be pruned)."""
    loaded = open_model(path, load)
    return loaded, require_module(loaded, command_name)


def _open_split(data, loaded, model, image_size, channels, seed):
    if data is None:
        return None
    split = open_data(data, image_size=image_size, channels=channels, seed=seed, like=loaded)
    with torch.no_grad():
        out = call(model.eval(), example_inputs(loaded, split))
    check_classes(out.shape[-1], split)
    return split


def _prune_config(ratio, target_macs, importance, global_, steps, round_to, ignore,
                  unstructured, from_sensitivity, max_drop, seed) -> PruneConfig:
    layer_ratios = {}
    if from_sensitivity is not None:
        layer_ratios = sens.pick_ratios(sens.load(from_sensitivity), max_drop)
    return PruneConfig(
        ratio=ratio, target_macs=target_macs, importance=importance,
        global_pruning=global_, steps=steps, round_to=round_to, ignore=ignore,
        unstructured=unstructured, layer_ratios=layer_ratios, seed=seed,
    )


def _rows(name_in: str, name_out: str, report, file_bytes) -> list[dict]:
    before = {"model": name_in, **report.before, "file_bytes": file_bytes}
    after = {"model": name_out, **report.after}
    return [before, after]


def _history(cfg, train_cfg, distill, report, file_bytes, data_name) -> dict:
    config = config_to_dict(cfg)
    if train_cfg is not None:
        config["finetune"] = {"data": data_name, "epochs": train_cfg.epochs, "lr": train_cfg.lr,
                              "distill": distill, "device": train_cfg.device,
                              "amp": train_cfg.amp}
    before = {**report.before, "file_bytes": file_bytes}
    after = dict(report.after)
    if report.pruned_top1 is not None:
        after["accuracy_before_finetune"] = report.pruned_top1
    if report.ratio is not None:
        after["channel_ratio"] = report.ratio
    timing = report.fit.timing_note() if report.fit is not None else None
    return history_entry("prune", config, before, after, report.notes + ([timing] if timing
                                                                          else []))


def register(app: typer.Typer) -> None:
    @command(app, "prune", epilog=PRUNE_EPILOG)
    @model_options
    @train_options
    def prune_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file to prune.")],
        output: OutOpt,
        ratio: Annotated[float | None, typer.Option(
            help="Fraction of channels removed, 0 <= R < 1 (weights with --unstructured).",
        )] = None,
        target_macs: Annotated[float | None, typer.Option(
            help="Fraction of the original MACs to keep, e.g. 0.5; the ratio is searched.")] = None,
        importance: ImportanceOpt = "l2",
        global_: Annotated[bool, typer.Option(
            "--global/--local", help="Rank channels across all layers, or per layer.")] = False,
        steps: Annotated[int, typer.Option(
            help="Iterative pruning in N steps, fine-tuning --epochs after each.")] = 1,
        round_to: Annotated[int | None, typer.Option(
            help="Keep channel counts multiples of N: 16 suits AVX-512 fp32 kernels, 8 AVX2. "
                 "A layer of N channels or fewer is left whole.")] = None,
        ignore: IgnoreOpt = None,
        unstructured: Annotated[bool, typer.Option(
            help="Zero the smallest weights instead (no MACs or speed saved).")] = False,
        from_sensitivity: Annotated[Path | None, typer.Option(
            help="Per-layer ratios from a `torchslim sensitivity` JSON file.")] = None,
        max_drop: Annotated[float, typer.Option(
            help="With --from-sensitivity: accuracy points a layer may cost.")] = 0.5,
        data: DataOpt = None,
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        epochs: Annotated[int, typer.Option(help="Fine-tuning epochs with --data.")] = 10,
        lr: Annotated[float, typer.Option(help="Fine-tuning peak learning rate.")] = 1e-3,
        distill: Annotated[bool, typer.Option(
            help="Fine-tune with the unpruned model as teacher (KL + CE).")] = False,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        fmt: FormatOpt = "table",
        load: LoadOptions = None,
        accel: TrainDevice = None,
    ) -> None:
        """Remove channels, neurons and heads (structured), or zero weights (--unstructured);
        optionally fine-tune on --data; save a smaller model that reloads without --trust."""
        check_format(fmt, ("table", "json"))
        check_model_output(output, force=force, inputs=[model_path, from_sensitivity])
        cfg = _prune_config(ratio, target_macs, importance, global_, steps, round_to,
                            _names(ignore), unstructured, from_sensitivity, max_drop, seed)
        if cfg.layer_ratios:
            picked = ", ".join(f"{k}={v:g}" for k, v in cfg.layer_ratios.items())
            stderr_console.print(f"[dim]per-layer ratios (max drop {max_drop:g}): {picked}[/]",
                                 highlight=False)
        if cfg.importance == "taylor" and data is None:
            raise TorchslimError(
                "--importance taylor needs gradients: add --data SPEC, or use --importance l2"
            )
        if distill and data is None:
            raise TorchslimError("--distill fine-tunes on data: add --data SPEC")
        loaded, model = _load(model_path, load, "prune")
        split = _open_split(data, loaded, model, image_size, channels, seed)
        example = example_inputs(loaded, split)
        train_cfg = (TrainConfig(epochs=epochs, lr=lr, seed=seed, **accel.train_kwargs())
                     if split is not None else None)
        pruned, report = _run(model, cfg, example, split, train_cfg, distill)
        meta = copy.deepcopy(loaded.meta)
        meta.set_input_spec(input_spec(loaded, split))
        meta.history.append(_history(cfg, train_cfg, distill, report, loaded.file_bytes,
                                     split.name if split else None))
        write_model(pruned, output, meta, force=force, inputs=[model_path])
        rows = _rows(str(model_path), str(output), report, loaded.file_bytes)
        rows[1]["file_bytes"] = Path(output).stat().st_size
        _emit(rows, report, fmt)

    @command(app, "sensitivity", epilog=SENS_EPILOG)
    @model_options
    def sensitivity_cmd(
        model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file to scan.")],
        output: OutOpt,
        data: DataOpt = None,
        ratios: Annotated[str, typer.Option(
            help="Comma-separated channel ratios to try per layer.")] = "0.1,0.3,0.5,0.7",
        importance: ImportanceOpt = "l2",
        ignore: IgnoreOpt = None,
        plot: Annotated[Path | None, typer.Option(
            help="PNG plot path (default: the output with .png).")] = None,
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        fmt: FormatOpt = "table",
        load: LoadOptions = None,
    ) -> None:
        """Prune each layer group alone at each ratio (no fine-tuning), measure validation
        accuracy, print a layer x ratio table, write JSON + a PNG plot."""
        check_format(fmt, ("table", "json"))
        if data is None:
            raise TorchslimError("sensitivity measures accuracy: add --data SPEC (e.g. digits)")
        plot = plot or Path(output).with_suffix(".png")
        for path in (output, plot):
            check_output(path, force=force, inputs=[model_path])
        ratio_list = _parse_ratios(ratios)
        loaded, model = _load(model_path, load, "sensitivity")
        split = _open_split(data, loaded, model, image_size, channels, seed)
        example = example_inputs(loaded, split)
        result = _scan(model, split, example, ratio_list, importance, _names(ignore))
        sens.save(result, output, force=force, inputs=[model_path])
        sens.plot(result, plot, force=force, inputs=[model_path])
        _emit_sensitivity(result, fmt)
        stderr_console.print(f"[dim]wrote {safe_markup(output)} and {safe_markup(plot)}[/]")


def _parse_ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TorchslimError(f"--ratios must be numbers like 0.1,0.3,0.5, got {text!r}") from None
    if not values:
        raise TorchslimError("--ratios is empty; e.g. --ratios 0.1,0.3,0.5,0.7")
    return values


def _run(model, cfg, example, split, train_cfg, distill):
    def say(msg: str) -> None:
        stderr_console.print(f"[dim]{safe_markup(msg)}[/]")

    if train_cfg is None or train_cfg.epochs == 0:
        return prune_model(model, cfg, example, data=split, train_cfg=train_cfg, on_stage=say)
    with fit_progress("fine-tuning") as cb:
        return prune_model(model, cfg, example, data=split, train_cfg=train_cfg,
                           distill=distill, callbacks=cb, on_stage=say)


def _emit(rows, report, fmt: str) -> None:
    for note in report.notes:
        stderr_console.print(f"[yellow]note:[/] {safe_markup(note)}", highlight=False)
    if report.pruned_top1 is not None:
        stderr_console.print(f"[dim]top-1 right after pruning (before fine-tuning): "
                             f"{fmt_pct(report.pruned_top1)}%[/]")
    if fmt == "json":
        typer.echo(render_text(rows, "json"))
    else:
        stdout_console.print(rich_table(rows, title="prune"))


def _scan(model, split, example, ratios, importance, ignore):
    from rich.progress import Progress

    with Progress(console=stderr_console, transient=True) as progress:
        task = progress.add_task("sensitivity", total=None)

        def tick(layer: str, r: float) -> None:
            progress.update(task, advance=1, description=f"{layer} @ {r:g}")

        return sens.scan(model, split, example, ratios, importance=importance, ignore=ignore,
                         on_progress=tick)


def _emit_sensitivity(result, fmt: str) -> None:
    if fmt == "json":
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from .render import Table

    table = Table(title=f"val top-1 % when one layer is pruned (unpruned "
                        f"{fmt_pct(result.baseline)})", header_style="bold cyan")
    table.add_column("layer")
    table.add_column("channels", justify="right")
    for r in result.ratios:
        table.add_column(f"{r:g}", justify="right")
    for layer in result.layers:
        cells = ["-" if a is None else fmt_pct(a) for a in result.accuracy[layer]]
        table.add_row(layer, fmt_count(result.channels[layer]), *cells)
    stdout_console.print(table)
