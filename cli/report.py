"""`torchslim report`: params, file size, MACs, CPU latency and accuracy, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tabulate import tabulate

from ..compress.io import LoadOptions
from ..compress.measure import measure
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
from .render import history_rows, render_text, rich_history, rich_table


def measure_files(paths, *, data, image_size, channels, seed, threads, batch_size,
                  load: LoadOptions, min_run_time=None):
    """Load and measure each file; data is loaded once, sized like the first model."""
    records, histories = [], []
    split = None
    for path in paths:
        loaded = open_model(path, load)
        if data and split is None:
            split = open_data(data, image_size=image_size, channels=channels, seed=seed,
                              like=loaded)
        with stderr_console.status(f"measuring {path}..."):
            rec = measure(loaded, name=str(path), inputs=load.inputs, data=split,
                          threads=threads, batch_size=batch_size, min_run_time=min_run_time)
        records.append(rec.to_dict())
        histories.append((str(path), loaded.meta.history))
    return records, histories


def _emit(records, histories, fmt: str) -> None:
    if fmt == "json":
        for rec, (_, hist) in zip(records, histories, strict=True):
            rec["history"] = hist
        typer.echo(render_text(records, "json"))
        return
    if fmt in ("markdown", "csv"):
        typer.echo(render_text(records, fmt))
        if fmt == "markdown":
            for name, hist in histories:
                if hist:
                    headers, body = history_rows(hist)
                    typer.echo(f"\nHistory of {name}:\n")
                    typer.echo(tabulate(body, headers=headers, tablefmt="github"))
        return
    stdout_console.print(rich_table(records, title="torchslim report"))
    for name, hist in histories:
        if hist:
            stdout_console.print(rich_history(name, hist))
    env = records[0].get("env") or {}
    stderr_console.print(
        f"[dim]latency: torch.utils.benchmark, {records[0].get('threads')} thread(s), "
        f"{env.get('cpu', 'cpu')}, torch {env.get('torch', '?')}[/]"
    )


def register(app: typer.Typer) -> None:
    @command(
        app,
        "report",
        epilog=(
            "Examples:\n\n"
            "  torchslim report pd.pt --data digits\n\n"
            "  torchslim report pd.pt pd-int8.onnx --format markdown\n\n"
            "  torchslim report weights.pth --arch resnet_small --input-shape 1,8,8 -f json\n\n"
            "  torchslim report model.pt --trust --input-shape 1,32,32   (your own class)\n\n"
            "  torchslim report lstm.pt --trust --input 1,20:int64   (token ids)"
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
        fmt: FormatOpt = "table",
        seed: SeedOpt = 0,
        load: LoadOptions = None,
    ) -> None:
        """Measure models: params, non-zero params, file size, MACs, latency, accuracy."""
        check_format(fmt)
        records, histories = measure_files(
            models, data=data, image_size=image_size, channels=channels, seed=seed,
            threads=threads, batch_size=batch_size, load=load, min_run_time=min_time,
        )
        _emit(records, histories, fmt)
