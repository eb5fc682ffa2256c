"""`torchslim demo`: the seed's story on the built-in digits data, measured end to end."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ..compress.io import save_model
from ..compress.measure import measure
from ..compress.train import TrainConfig
from .common import FormatOpt, ThreadsOpt, check_format, command, open_data, stderr_console
from .render import render_text, rich_table
from .train import train_registry_model

SEED_SIZE = (60, 120)  # the seed's PD sensor images are 1x60x120


def register(app: typer.Typer) -> None:
    @command(app, "demo", epilog="Example: torchslim demo --workdir demo-out")
    def demo_cmd(
        workdir: Annotated[
            Path | None,
            typer.Option(help="Keep the trained and compressed models here (default: a temp "
                              "folder, removed at the end)."),
        ] = None,
        epochs: Annotated[int, typer.Option(help="Baseline training epochs.")] = 12,
        threads: ThreadsOpt = None,
        fmt: FormatOpt = "table",
    ) -> None:
        """Train the seed's PDModel on digits at 1x60x120, then measure it."""
        check_format(fmt)
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="torchslim-demo-") as tmp:
                _run(Path(tmp), epochs, threads, fmt)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            _run(workdir, epochs, threads, fmt)


def _run(workdir: Path, epochs: int, threads: int | None, fmt: str) -> None:
    data = open_data("digits", image_size=f"{SEED_SIZE[0]},{SEED_SIZE[1]}")
    stderr_console.print(f"[dim]{data.describe()}[/]")
    cfg = TrainConfig(epochs=epochs, lr=2e-3, batch_size=64, seed=0)
    model, meta, _ = train_registry_model("pd_model", data, cfg, title="PDModel baseline")
    base_path = save_model(model, workdir / "pd_model.pt", meta, force=True)
    rows = [measure_row(base_path, "PDModel (baseline)", data, threads)]
    _show(rows, fmt)


def measure_row(path: Path, name: str, data, threads):
    from ..compress.io import load_model

    with stderr_console.status(f"measuring {name}..."):
        return measure(load_model(path), name=name, data=data, threads=threads).to_dict()


def _show(rows, fmt: str) -> None:
    from .common import stdout_console

    if fmt == "table":
        stdout_console.print(rich_table(rows, title="torchslim demo: digits at 1x60x120"))
    else:
        typer.echo(render_text(rows, fmt))
