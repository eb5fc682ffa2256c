"""`torchslim report`: params, file size, MACs, CPU latency and accuracy, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tabulate import tabulate

from ..compress.agreement import agreement
from ..compress.baselines import RUNTIMES, measure_runtimes
from ..compress.errors import UsageError
from ..compress.inputs import InputSpec
from ..compress.io import LoadOptions
from .common import (
    ChannelsOpt,
    DataOpt,
    FormatOpt,
    ImageSizeOpt,
    SeedOpt,
    ThreadsOpt,
    check_format,
    command,
    model_options,
    open_data,
    open_model,
    stderr_console,
    stdout_console,
)
from .render import (
    Table,
    compare_layer_rows,
    env_line,
    history_rows,
    layer_rows,
    layer_summary,
    layers_csv,
    render_text,
    rich_history,
    rich_table,
    safe_markup,
    safe_text,
    stats_rows,
    stats_title,
)


def measure_files(paths, *, data, image_size, channels, seed, threads, batch_size,
                  load: LoadOptions, min_run_time=None, runtime="torch", layers=False,
                  agreement_samples=None):
    """Load and measure each file in the runtime(s) asked for; data is loaded once, sized like
    the first model. ``agreement_samples`` adds each file's agreement with the first."""
    records, histories, loaded_files = [], [], []
    split = None
    for path in paths:
        loaded = open_model(path, load)
        if data and split is None:
            split = open_data(data, image_size=image_size, channels=channels, seed=seed,
                              like=loaded)
        with stderr_console.status(f"measuring {safe_markup(path)}..."):
            measured = measure_runtimes(
                loaded, runtime, name=str(path), inputs=load.inputs, data=split,
                threads=threads, batch_size=batch_size, min_run_time=min_run_time,
                layers=layers)
        if agreement_samples:
            with stderr_console.status(f"comparing {safe_markup(path)}'s outputs with "
                                       f"{safe_markup(paths[0])}'s..."):
                agreed = agreement(loaded_files[0] if loaded_files else loaded, loaded,
                                   inputs=load.inputs or InputSpec.parse(measured[0].inputs),
                                   data=split,
                                   n=agreement_samples, threads=measured[0].threads)
            for rec in measured:
                rec.fidelity_top1_agreement = agreed["fidelity_top1_agreement"]
                rec.fidelity_rel_error = agreed["fidelity_rel_error"]
        loaded_files.append(loaded)
        for rec in measured:
            records.append(rec.to_dict())
            histories.append((str(path), loaded.meta.history))
    return records, histories


def _emit(records, histories, fmt: str, top: int = 15) -> None:
    _warn(records)
    layered = any(r.get("layers") for r in records)
    if fmt == "json":
        for rec, (_, hist) in zip(records, histories, strict=True):
            rec["history"] = hist
        typer.echo(render_text(records, "json"))
        return
    if fmt == "csv":
        typer.echo(layers_csv(records) if layered else render_text(records, "csv"))
        return
    if fmt == "markdown":
        _emit_markdown(records, histories, top, layered)
        return
    stdout_console.print(rich_table(records, title="torchslim report"))
    stdout_console.print(_rich(*stats_rows(records), title=stats_title(records)))
    if layered:
        for title, (headers, body), summary in _layer_views(records, top):
            stdout_console.print(_rich(headers, body, title=title))
            for line in summary:
                stdout_console.print(f"[dim]{safe_markup(line)}[/]", highlight=False)
    for name, hist in _unique(histories):
        if hist:
            stdout_console.print(rich_history(name, hist))
    stderr_console.print(f"[dim]{safe_markup(env_line(records[0].get('env') or {}))}[/]",
                         highlight=False)


def _emit_markdown(records, histories, top: int, layered: bool) -> None:
    typer.echo(render_text(records, "markdown"))
    headers, body = stats_rows(records)
    typer.echo(f"\n{stats_title(records)}:\n")
    typer.echo(tabulate(body, headers=headers, tablefmt="github"))
    if layered:
        for title, (headers, body), summary in _layer_views(records, top):
            typer.echo(f"\n{safe_text(title)}:\n")
            typer.echo(tabulate(body, headers=headers, tablefmt="github"))
            typer.echo("\n" + "\n".join(f"- {safe_text(line)}" for line in summary))
    for name, hist in _unique(histories):
        if hist:
            headers, body = history_rows(hist)
            typer.echo(f"\nHistory of {safe_text(name)} (as stated by the file):\n")
            typer.echo(tabulate(body, headers=headers, tablefmt="github"))
    typer.echo(f"\n{env_line(records[0].get('env') or {})}")


def _layer_views(records, top: int):
    """(title, table, summary lines) per profile; a record of a later file is lined up with
    the first file's record in the same runtime, layer by layer."""
    first = records[0]["model"]
    shown = set()
    for i, rec in enumerate(records):
        base = next((j for j, r in enumerate(records) if r["model"] == first
                     and r["runtime"] == rec["runtime"]), None)
        if rec["model"] == first or base is None:
            continue
        a = records[base]
        shown |= {base, i}
        title = (f"layers: A = {a['model']} against B = {rec['model']} ({rec['runtime']}), "
                 f"top {top} by A's time")
        summary = [f"A: {line}" for line in layer_summary(a)] + \
            [f"B: {line}" for line in layer_summary(rec)]
        yield title, compare_layer_rows(a, rec, top), summary
    for i, rec in enumerate(records):
        if i not in shown:
            title = f"layers of {rec['model']} ({rec['runtime']}), top {top} by time"
            yield title, layer_rows(rec["layers"], top), layer_summary(rec)


def _rich(headers, body, title: str) -> Table:
    table = Table(title=title, header_style="bold cyan")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right")
    for line in body:
        table.add_row(*line)
    return table


def _unique(histories):
    """A file measured in two runtimes has one history."""
    seen = set()
    for name, hist in histories:
        if name not in seen:
            seen.add(name)
            yield name, hist


def _warn(records) -> None:
    """Warnings and notes go to stderr, whatever the format, so stdout stays the result."""
    for rec in records:
        for w in rec.get("warnings") or []:
            stderr_console.print(f"[yellow]warning:[/] {safe_markup(rec['model'])} "
                                 f"({rec['runtime']}): {safe_markup(w)}",
                                 highlight=False, soft_wrap=True)
        for n in rec.get("notes") or []:
            stderr_console.print(f"[dim]note: {safe_markup(rec['model'])} ({rec['runtime']}): "
                                 f"{safe_markup(n)}[/]",
                                 highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @command(
        app,
        "report",
        epilog=(
            "Examples:\n\n"
            "  torchslim report pd.pt --data digits\n\n"
            "  torchslim report pd.pt pd-int8.onnx --runtime all\n\n"
            "  torchslim report pd.pt pd-pruned.pt --layers --top 10\n\n"
            "  torchslim report pd.pt pd-int8.onnx --agreement --data digits\n\n"
            "  torchslim report weights.pth --arch resnet_small --input-shape 1,8,8 -f json\n\n"
            "  torchslim report model.pt --trust --input-shape 1,32,32   (your own class)\n\n"
            "  torchslim report lstm.pt --trust --input 1,20:int64   (token ids)\n\n"
            "ONNX exports for --runtime onnxruntime/all are cached in $TORCHSLIM_CACHE_DIR "
            "(default ~/.cache/torchslim/onnx), keyed by the model file's SHA-256."
        ),
    )
    @model_options
    def report_cmd(
        models: Annotated[list[Path], typer.Argument(help="Model files; the first is the "
                                                          "baseline for ratios.")],
        data: DataOpt = None,
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        threads: ThreadsOpt = None,
        batch_size: Annotated[int, typer.Option(help="Larger batch for throughput latency.")] = 32,
        min_time: Annotated[
            float | None,
            typer.Option(help="Seconds of timing per batch size (more = steadier numbers)."),
        ] = None,
        runtime: Annotated[str, typer.Option(
            help="torch | onnxruntime | all: where torch models run (onnxruntime and all "
            "measure an fp32 ONNX export of them, cached). ONNX files always run in ONNX "
            "Runtime.")] = "torch",
        layers: Annotated[bool, typer.Option(
            "--layers", help="Per-layer profile: params, MACs, weight bytes and share of "
            "the batch-1 time (forward hooks / ONNX Runtime's profiler); two models are "
            "lined up by layer name.")] = False,
        top: Annotated[int, typer.Option(help="Layers shown by --layers before 'rest'.")] = 15,
        agreement_flag: Annotated[bool, typer.Option(
            "--agreement", help="Top-1 agreement and relative output error of each model "
            "against the first, on --data's validation inputs or generated ones (no labels "
            "needed).")] = False,
        samples: Annotated[int, typer.Option(
            help="Inputs for --agreement.")] = 256,
        fmt: FormatOpt = "table",
        seed: SeedOpt = 0,
        load: LoadOptions = None,
    ) -> None:
        """Measure models: params, non-zero params, file size, MACs, latency statistics,
        accuracy; optionally per layer, in several runtimes, and against the first model."""
        check_format(fmt)
        if runtime not in RUNTIMES:
            raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if agreement_flag and samples < 1:
            raise UsageError(f"--samples must be at least 1, got {samples}")
        records, histories = measure_files(
            models, data=data, image_size=image_size, channels=channels, seed=seed,
            threads=threads, batch_size=batch_size, load=load, min_run_time=min_time,
            runtime=runtime, layers=layers, agreement_samples=samples if agreement_flag else None,
        )
        _emit(records, histories, fmt, top)
