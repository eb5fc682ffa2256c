"""Options, error handling and progress display shared by every command."""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..compress.data import DataSplit, load_data, parse_size
from ..compress.errors import TorchslimError, UsageError
from ..compress.io import LoadedModel, load_model
from ..compress.train import Callbacks, EpochStats

stderr_console = Console(stderr=True)
# Piped or redirected output gets a wide table rather than rich's 80-column default.
stdout_console = Console() if Console().is_terminal else Console(width=180)


@dataclass
class _State:
    verbose: bool = os.environ.get("TORCHSLIM_VERBOSE", "") not in ("", "0")


STATE = _State()

# --- shared options -------------------------------------------------------------------
ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file: a torchslim .pt, a pickled nn.Module (needs --trust), TorchScript, "
        "ONNX, or a state_dict with --arch.",
        show_default=False,
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Allow unpickling a full nn.Module or importing --arch module:Class. Pickles run "
        "code: only for files you trust. Also TORCHSLIM_TRUST=1.",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch", help="Architecture of a state_dict: a registry name (`torchslim models`) or "
        "module:Class (needs --trust)."
    ),
]
NumClassesOpt = Annotated[
    int | None, typer.Option("--num-classes", help="Classes, for --arch (default: inferred).")
]
InChannelsOpt = Annotated[int | None, typer.Option("--in-channels", help="Input channels.")]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", "-d",
        help="`digits` (built in), `fashion-mnist` (apt-get install dataset-fashion-mnist; "
        "official test split kept), a folder of IDX files (train-/t10k-images-idx3-ubyte[.gz] "
        "+ labels), an image folder (one sub-folder per class) or a .npz/.pt file with x and y.",
    ),
]
ImageSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--image-size",
        help="Resize images to H,W (e.g. 60,120). Default: the model's input size when known.",
    ),
]
ChannelsOpt = Annotated[
    int | None, typer.Option("--channels", help="Image channels: 1 (grayscale) or 3.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the split and training.")]
OutOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Output file (never an input file).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for latency (default: all cores).")
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape", help="Input shape C,H,W or 1,C,H,W (default: file metadata, then data)."
    ),
]
FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="table | markdown | csv | json")
]
FORMATS = ("table", "markdown", "csv", "json")


# --- error handling -------------------------------------------------------------------
def command(app: typer.Typer, name: str | None = None, **kwargs) -> Callable:
    """Register a command whose TorchslimError becomes one red line and an exit code."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except TorchslimError as exc:
                fail(str(exc), exc.exit_code)
            except KeyboardInterrupt:
                fail("interrupted; no output was written", 130)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as exc:  # a bug: say so in one line, traceback with --verbose
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                fail(
                    f"internal error: {type(exc).__name__}: {first} (rerun with --verbose "
                    "for the traceback and report it)",
                    1,
                )

        return app.command(name, **kwargs)(wrapper)

    return deco


def fail(message: str, code: int = 1):
    if STATE.verbose:
        stderr_console.print(traceback.format_exc(), markup=False, highlight=False)
    stderr_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise UsageError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}")
    return fmt


# --- loading --------------------------------------------------------------------------
def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``3,32,32`` or ``1,3,32,32`` -> (3, 32, 32)."""
    if not text:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be integers like 1,60,120, got {text!r}") from None
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) not in (1, 2, 3) or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be C,H,W (positive integers), got {text!r}")
    return dims


def open_model(
    path: Path,
    *,
    trust: bool = False,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> LoadedModel:
    size = tuple(input_shape[-2:]) if input_shape and len(input_shape) == 3 else None
    channels = in_channels or (input_shape[0] if input_shape and len(input_shape) == 3 else None)
    loaded = load_model(
        path, trust=trust, arch=arch, num_classes=num_classes, in_channels=channels,
        input_size=size,
    )
    if input_shape:
        loaded.meta.input_shape = tuple(input_shape)
    return loaded


def open_data(
    spec: str,
    *,
    image_size: str | None = None,
    channels: int | None = None,
    seed: int = 0,
    like: LoadedModel | None = None,
    train_limit: int | None = None,
) -> DataSplit:
    """Load data, sized like the model's recorded input when no size is given."""
    size = parse_size(image_size)
    shape = like.meta.input_shape if like is not None else None
    if size is None and shape and len(shape) == 3:
        size = tuple(shape[1:])
    if channels is None and shape and len(shape) == 3:
        channels = shape[0]
    with stderr_console.status(f"loading data {spec}..."):
        return load_data(spec, size=size, channels=channels, seed=seed, train_limit=train_limit)


# --- progress -------------------------------------------------------------------------
@contextmanager
def fit_progress(title: str) -> Iterator[Callbacks]:
    """Rich progress bar over all training steps, with validation accuracy per epoch."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        transient=False,
    )
    task = progress.add_task(title, total=None, status="")
    best = [0.0]

    def on_start(epochs: int, steps: int) -> None:
        progress.update(task, total=epochs * steps)

    def on_step(epoch: int, step: int, loss: float) -> None:
        progress.update(task, advance=1, status=f"epoch {epoch} loss {loss:.3f}")

    def on_epoch(s: EpochStats) -> None:
        best[0] = max(best[0], s.val_top1)
        progress.update(task, status=f"epoch {s.epoch} val {s.val_top1:.2f}% best {best[0]:.2f}%")

    with progress:
        yield Callbacks(on_start=on_start, on_step=on_step, on_epoch=on_epoch)
