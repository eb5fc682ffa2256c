"""Options, error handling and progress display shared by every command."""

from __future__ import annotations

import errno
import functools
import inspect
import os
import signal
import threading
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
from rich.text import Text

from ..compress.bounds import check_inputs, check_torch
from ..compress.data import DataSplit, load_data, parse_size
from ..compress.device import AMPS, DEVICES, TrainDevice
from ..compress.errors import TorchslimError, UsageError
from ..compress.inputs import InputSpec, resolve
from ..compress.io import WRITTEN, LoadedModel, LoadOptions, trust_env
from ..compress.train import Callbacks, EpochStats
from .render import safe_markup, safe_text


class SafeConsole(Console):
    """A console that never passes a control character through: whatever a site forgot to
    escape, an ESC from a file's content reaches the terminal as the text ``\\x1b``."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(safe_text(o, multiline=True) if isinstance(o, str) else o
                        for o in objects), **kwargs)

    def status(self, status, *args, **kwargs):
        return super().status(safe_text(status) if isinstance(status, str) else status,
                              *args, **kwargs)


stderr_console = SafeConsole(stderr=True)
# Piped or redirected output gets a wide table rather than rich's 80-column default.
stdout_console = SafeConsole() if Console().is_terminal else SafeConsole(width=180)


@dataclass
class _State:
    verbose: bool = os.environ.get("TORCHSLIM_VERBOSE", "") not in ("", "0")
    # What an interrupted run can continue from (distill's checkpoint), set once it exists.
    resume_hint: str | None = None


STATE = _State()
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

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
TrainLimitOpt = Annotated[
    int | None,
    typer.Option("--train-limit", min=1, help="Train on a stratified subset of this many "
                 "training samples (quick runs on a large data set)."),
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
        "--input-shape", help="Input shape C,H,W or 1,C,H,W of an image model (default: file "
        "metadata, then data)."
    ),
]
InputOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input", help="A model input as SHAPE[:DTYPE[:HIGH]], batch first, e.g. 1,20:int64 "
        "for token ids or 1,16,32 for a sequence; repeat for several inputs, in forward's "
        "order. HIGH bounds generated integers (default: the smallest embedding's size)."
    ),
]
CodePathOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--code-path", help="With --trust: a folder to import your model's Python classes "
        "from (repeatable). The current directory and the model file's folder are searched "
        "too. Also TORCHSLIM_CODE_PATH."
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help=f"Where training runs: {DEVICES} (auto: CUDA when torch sees a GPU, "
        "else CPU). Measuring always runs on the CPU; outputs are saved from the CPU.",
    ),
]
AmpOpt = Annotated[
    str,
    typer.Option(
        "--amp", help=f"Mixed precision for training: {' | '.join(AMPS)} (bf16: torch.autocast "
        "on the forward passes; weights and saved models stay fp32).",
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
            STATE.resume_hint = None
            WRITTEN.clear()
            try:
                with signals_raise():
                    return fn(*args, **kw)
            except TorchslimError as exc:
                fail(str(exc), exc.exit_code)
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through signals_raise
                signum = getattr(exc, "signum", signal.SIGINT)
                fail(interrupted_message(signum), 128 + signum)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except OSError as exc:
                if exc.errno not in DISK_ERRORS:
                    internal_error(exc)
                fail(f"{exc.strerror}: {exc.filename or ''}; free space or fix the folder's "
                     "permissions and run again", 1)  # e.g. a full /tmp under a temp dir
            except Exception as exc:  # a bug: say so in one line, traceback with --verbose
                internal_error(exc)

        return app.command(name, **kwargs)(wrapper)

    return deco


def internal_error(exc: BaseException):
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    fail(f"internal error: {type(exc).__name__}: {first} (rerun with --verbose for the "
         "traceback and report it)", 1)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) as an exception, so ``with`` and ``finally`` remove temp files."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while a command
    runs; after the first, both are ignored so the clean-up they trigger can finish."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def note_resumable(hint: str) -> None:
    """Tell an interrupted run's message how to continue (e.g. distill's --resume)."""
    STATE.resume_hint = hint


def interrupted_message(signum: int) -> str:
    kept = [str(p) for p in dict.fromkeys(WRITTEN) if p.exists()]
    what = f"kept {', '.join(kept)}" if kept else "no output was written"
    then = STATE.resume_hint or "run the command again to start over"
    return (f"interrupted by {signal.Signals(signum).name}: {what}, temporary files were "
            f"removed; {then}")


def fail(message: str, code: int = 1):
    if STATE.verbose:
        stderr_console.print(traceback.format_exc(), markup=False, highlight=False)
    # the message names paths and file content: printed as text, one line, never markup
    stderr_console.print(Text.assemble(("error:", "bold red"), " ", safe_text(message)),
                         highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise UsageError(f"--format must be one of {', '.join(allowed)}, got {fmt!r}")
    return fmt


# --- loading --------------------------------------------------------------------------
# Every model-reading command takes these options through @model_options and gets one
# LoadOptions object: a new loading option is added here, not in each command.
LOAD_PARAMS = {
    "trust": (TrustOpt, False),
    "arch": (ArchOpt, None),
    "num_classes": (NumClassesOpt, None),
    "in_channels": (InChannelsOpt, None),
    "input_shape": (InputShapeOpt, None),
    "input_": (InputOpt, None),
    "code_path": (CodePathOpt, None),
}


def model_options(fn: Callable) -> Callable:
    """Give a command the shared loading options; it receives them as ``load: LoadOptions``.

    The command's own signature keeps its parameters (``load`` removed) and gains the
    shared ones, so typer shows them in every command's --help.
    """
    return _shared_options(fn, LOAD_PARAMS, "load", load_options)


# Every command that trains takes these through @train_options and gets one TrainDevice.
TRAIN_PARAMS = {
    "device": (DeviceOpt, "auto"),
    "amp": (AmpOpt, "off"),
}


def train_options(fn: Callable) -> Callable:
    """Give a command --device and --amp; it receives them as ``accel: TrainDevice``."""
    return _shared_options(fn, TRAIN_PARAMS, "accel", TrainDevice.parse)


def _shared_options(fn: Callable, params: dict, into: str, build: Callable) -> Callable:
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != into]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                               default=default) for name, (ann, default) in params.items()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        raw = {name: kwargs.pop(name, default) for name, (_, default) in params.items()}
        kwargs[into] = build(**raw)
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper


def load_options(*, trust=False, arch=None, num_classes=None, in_channels=None,
                 input_shape=None, input_=None, code_path=None) -> LoadOptions:
    """The command-line values -> LoadOptions (usage errors say which option was wrong)."""
    trust_env()  # an unclear TORCHSLIM_TRUST is refused before anything is opened
    if input_shape and input_:
        raise UsageError("give --input-shape (one image input) or --input (any inputs), "
                         "not both")
    shape = parse_input_shape(input_shape)
    spec = InputSpec.parse(input_) if input_ else (InputSpec.image(shape) if shape else None)
    return LoadOptions(trust=trust, arch=arch, num_classes=num_classes,
                       in_channels=in_channels, inputs=spec,
                       code_paths=tuple(Path(p) for p in code_path or ()))


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


def open_model(path: Path, load: LoadOptions | None = None) -> LoadedModel:
    with stderr_console.status(f"loading {safe_markup(path)}..."):
        return (load or LoadOptions()).load(path)


def input_spec(loaded: LoadedModel, split: DataSplit | None = None) -> InputSpec:
    """The model's inputs: stated (--input/--input-shape) or recorded in the file, else the
    data's; integer bounds from the model's embeddings."""
    spec = resolve(loaded.meta.input_spec(), split.inputs if split is not None else None,
                   model=loaded.model)
    if spec is None:
        raise TorchslimError("cannot tell the model's input: pass --input-shape C,H,W, or "
                             "--input SHAPE:DTYPE per input (e.g. --input 1,20:int64), or --data")
    check_inputs(spec, 1)  # before any command traces or runs the model on it
    check_torch(loaded.model, spec.example(1), 1, loaded.name)
    return spec


def example_inputs(loaded: LoadedModel, split: DataSplit | None = None) -> tuple:
    """One generated sample of every input (batch 1): what tracing and MACs run on."""
    return input_spec(loaded, split).example(1)


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
    stated = size is not None or channels is not None
    model_spec = like.meta.input_spec() if like is not None else None
    shape = model_spec.image_shape if model_spec is not None else None
    if size is None and shape:
        size = tuple(shape[1:])
    if channels is None and shape:
        channels = shape[0]
    with stderr_console.status(f"loading data {safe_markup(spec)}..."):
        return load_data(spec, size=size, channels=channels, seed=seed,
                         train_limit=train_limit, like=model_spec, strict_image=stated)


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
