"""The torchslim command: a typer app whose commands live one per module in this package."""

from __future__ import annotations

import importlib
import sys

import typer

from .. import __version__
from . import common

# Each module defines register(app); the order is the order `--help` lists them.
COMMAND_MODULES = [
    "demo", "compress", "report", "train", "models", "prune", "swap", "distill",
    "quantize",
]

app = typer.Typer(
    name="torchslim",
    help=(
        "Make PyTorch models smaller and faster from the shell: swap, prune, quantize, "
        "distil, and measure params, size, MACs, CPU latency and accuracy before and after.\n\n"
        "Start with `torchslim demo`, then `torchslim report MODEL --data digits`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"torchslim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show tracebacks and debug logs on errors."
    ),
) -> None:
    common.STATE.verbose = verbose or common.STATE.verbose


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)


def main() -> None:
    """Console-script entry point. ``--verbose`` may also come after the command."""
    argv = sys.argv[1:]
    if any(a in ("--verbose", "-v") for a in argv[1:]):
        argv = ["--verbose", *[a for a in argv if a not in ("--verbose", "-v")]]
    app(args=argv, prog_name="torchslim")
