"""`torchslim models`: list the reference-model registry."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from tabulate import tabulate

from ..compress.measure import count_macs, count_params
from ..models.registry import create_model, list_models, model_info
from .common import FormatOpt, check_format, command, stdout_console
from .render import Table


def _rows(pattern: str) -> list[dict]:
    import torch

    rows = []
    for name in list_models(pattern):
        info = model_info(name)
        model = create_model(name).eval()
        shape = (1, 1, *info["input_size"])
        rows.append({
            "name": name,
            "family": info["family"],
            "input": "x".join(map(str, shape[1:])),
            "params": count_params(model)[0],
            "macs": count_macs(model, torch.zeros(shape)),
            "description": info["description"],
        })
    return rows


def register(app: typer.Typer) -> None:
    @command(app, "models", epilog="Example: torchslim models 'resnet*' --format json")
    def models_cmd(
        pattern: Annotated[str, typer.Argument(help="Shell pattern, e.g. 'pd*'.")] = "*",
        fmt: FormatOpt = "table",
    ) -> None:
        """List the reference models (params and MACs measured at their default input)."""
        check_format(fmt)
        rows = _rows(pattern)
        if fmt == "json":
            typer.echo(json.dumps(rows, indent=2))
            return
        if fmt in ("markdown", "csv"):
            typer.echo(tabulate(rows, headers="keys", tablefmt="github" if fmt == "markdown"
                                else "tsv"))
            return
        table = Table(title="torchslim reference models", header_style="bold cyan")
        for col in ("name", "family", "input", "params", "MACs", "description"):
            table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
        for r in rows:
            table.add_row(r["name"], r["family"], r["input"], f"{r['params']:,}",
                          f"{r['macs']:,}", r["description"])
        stdout_console.print(table)
