"""`torchslim distill`: a trained teacher teaches a student (any model file or registry name).

Under `torchrun --nproc-per-node N -m torchslim distill ...` it trains with
DistributedDataParallel; only rank 0 prints and writes files.
"""

from __future__ import annotations

import copy
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..compress.config import config_to_dict
from ..compress.device import TrainDevice
from ..compress.distill import Dist, DistillConfig, dist_from_env, distill
from ..compress.errors import TorchslimError, UsageError
from ..compress.io import (
    LoadedModel,
    LoadOptions,
    ModelMeta,
    atomic_write,
    check_output,
    history_entry,
    load_model,
    require_module,
    save_model,
)
from ..compress.measure import measure
from ..compress.safeload import load_checked
from ..compress.train import Callbacks
from ..models.registry import arch_spec, create_model, is_registered
from .common import (
    ChannelsOpt,
    DataOpt,
    ForceOpt,
    ImageSizeOpt,
    SeedOpt,
    ThreadsOpt,
    TrainLimitOpt,
    command,
    fit_progress,
    input_spec,
    model_options,
    note_resumable,
    open_data,
    open_model,
    stderr_console,
    stdout_console,
    train_options,
)
from .render import render_text, rich_table
from .swap import numbers

EPILOG = (
    "Examples: torchslim distill --teacher pd.pt --student pd_light --data digits "
    "--image-size 60,120 --epochs 30 -o light.pt  "
    "| torchrun --nproc-per-node 2 -m torchslim distill --teacher pd.pt --student pd_light "
    "--data digits -o light.pt"
)


def _student(spec: str, split, num_classes, load) -> tuple[torch.nn.Module, ModelMeta]:
    """A model file, else a registry name (or alias) built for the data's shape and classes."""
    if Path(spec).exists():
        loaded = open_model(Path(spec), load)
        return require_module(loaded, "distill"), copy.deepcopy(loaded.meta)
    if not is_registered(spec):
        raise TorchslimError(
            f"--student {spec!r} is neither a file nor a registry model; "
            "run `torchslim models` to list the registry"
        )
    if not split.is_image:
        raise TorchslimError(f"registry students are image models, but {split.name} holds "
                             f"{split.inputs.describe()} samples; pass a student model file")
    c, h, w = split.input_shape
    classes = num_classes or split.num_classes
    torch.manual_seed(0)
    model = create_model(spec, num_classes=classes, in_channels=c, input_size=(h, w))
    spec_d = arch_spec(spec, num_classes=classes, in_channels=c, input_size=(h, w))
    return model, ModelMeta(arch=spec_d, input_shape=split.input_shape,
                            class_names=split.class_names)


def _load_resume(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not path.is_file():
        raise TorchslimError(f"--resume {path}: no such checkpoint file")
    try:
        state = load_checked(path)  # tensors and containers only, sizes checked
    except Exception:  # corrupt, truncated, or a pickle of objects: not ours either way
        state = None
    if not isinstance(state, dict) or "epoch" not in state or "optimizer" not in state:
        raise TorchslimError(
            f"--resume {path}: not a torchslim distill checkpoint; pass the OUTPUT.ckpt file "
            "an interrupted `torchslim distill` run left behind"
        )
    return state


def _callbacks(d: Dist, ckpt: Path, stack) -> Callbacks:
    """Progress and checkpoints on rank 0 only; other ranks train silently."""
    if not d.main:
        return Callbacks()
    cb = stack.enter_context(fit_progress("distilling"))

    def on_checkpoint(state: dict) -> None:
        atomic_write(ckpt, lambda tmp: torch.save(state, tmp), force=True)
        note_resumable(f"the checkpoint after epoch {state['epoch']} is {ckpt}: rerun with "
                       f"--resume {ckpt} to continue")

    return Callbacks(cb.on_start, cb.on_step, cb.on_epoch, on_checkpoint)


def _table(teacher: LoadedModel, output: Path, split, threads, fmt: str) -> None:
    rows = []
    for name, target in (("teacher", teacher), ("student", load_model(output))):
        with stderr_console.status(f"measuring {name}..."):
            rec = measure(target, name=f"{name}: {target.name}", data=split, threads=threads)
        rows.append(rec.to_dict())
    if fmt == "json":
        typer.echo(render_text(rows, "json"))
    else:
        stdout_console.print(rich_table(rows, title="teacher vs student"))
    t_acc, s_acc = rows[0].get("accuracy"), rows[1].get("accuracy")
    if t_acc is not None and s_acc is not None and s_acc > t_acc:
        stderr_console.print(
            f"[yellow]note: the student ({s_acc:.2f} %) beats its teacher ({t_acc:.2f} %), so "
            "the soft targets teach some of the teacher's mistakes; a stronger teacher, or a "
            "lower --alpha, should help (see examples/bench_seed.py)[/yellow]")


def register(app: typer.Typer) -> None:
    @command(app, "distill", epilog=EPILOG)
    @model_options
    @train_options
    def distill_cmd(
        teacher: Annotated[Path, typer.Option(help="Trained teacher model file.")],
        student: Annotated[str, typer.Option(
            help="Student: a model file, or a registry name (`torchslim models`).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Output file.")],
        data: DataOpt = "digits",
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        epochs: Annotated[int, typer.Option(help="Epochs.")] = 30,
        batch_size: Annotated[int, typer.Option(
            help="Global batch size (split across torchrun processes).")] = 64,
        lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 3e-3,
        temperature: Annotated[float, typer.Option(help="KD temperature T.")] = 4.0,
        alpha: Annotated[float, typer.Option(
            help="Weight of the soft (teacher) loss; 1 - alpha weighs the labels.")] = 0.7,
        match: Annotated[list[str] | None, typer.Option(
            help="Feature loss on teacher.layer:student.layer (repeat); a learned 1x1 "
            "adapter bridges different widths.")] = None,
        feature_loss: Annotated[float, typer.Option(
            help="Weight of the feature loss on --match layers.")] = 1.0,
        augment: Annotated[bool, typer.Option(help="Random-shift augmentation.")] = True,
        hflip: Annotated[bool, typer.Option(
            help="Also random horizontal flips (off: sensor images are not mirror-invariant).")
        ] = False,
        resume: Annotated[Path | None, typer.Option(
            help="Continue from a checkpoint written by an interrupted run.")] = None,
        checkpoint: Annotated[Path | None, typer.Option(
            help="Checkpoint written after every epoch (default OUTPUT.ckpt; removed when "
            "the run finishes).")] = None,
        train_limit: TrainLimitOpt = None,
        seed: SeedOpt = 0,
        threads: ThreadsOpt = None,
        force: ForceOpt = False,
        fmt: Annotated[str, typer.Option("--format", "-f", help="table | json")] = "table",
        load: LoadOptions = None,
        accel: TrainDevice = None,
    ) -> None:
        """Distil --teacher into --student on --data (Hinton KD, optional feature loss), keep
        the best validation epoch, and print a teacher vs student table."""
        if fmt not in ("table", "json"):
            raise UsageError(f"--format must be table or json, got {fmt!r}")
        cfg = DistillConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                            temperature=temperature, alpha=alpha, augment=augment, hflip=hflip,
                            matches=tuple(match or ()), feature_weight=feature_loss,
                            **accel.train_kwargs())
        inputs = [teacher] + ([Path(student)] if Path(student).exists() else [])
        check_output(output, force=force, inputs=inputs)
        ckpt = checkpoint or output.with_name(output.name + ".ckpt")
        state = _load_resume(resume)
        t_loaded = open_model(teacher, load)
        t_model = require_module(t_loaded, "distill")
        split = open_data(data, image_size=image_size, channels=channels, seed=seed,
                          train_limit=train_limit,
                          like=t_loaded)
        s_model, meta = _student(student, split, load.num_classes, load)
        d = dist_from_env()
        if d.main:
            stderr_console.print(f"[dim]{split.describe()}"
                                 + (f", {d.world} processes" if d.world > 1 else "") + "[/]")
        example = input_spec(t_loaded, split).example(1)
        before = numbers(s_model, example, split)
        with ExitStack() as stack:
            cb = _callbacks(d, ckpt, stack)
            s_model, result = distill(t_model, s_model, split, cfg, cb, resume=state,
                                      dist_info=d)
        _finish(d, s_model.cpu().eval(), meta, cfg, before, example, split, result, teacher,
                t_loaded, output, ckpt, force, inputs, threads, fmt)


def _finish(d, student, meta, cfg, before, example, split, result, teacher_path, t_loaded,
            output, ckpt, force, inputs, threads, fmt) -> None:
    if d.main:
        after = numbers(student, example, split)
        if meta.input_spec() is None:
            meta.set_input_spec(split.inputs)
        meta.history.append(history_entry(
            "distill", {**config_to_dict(cfg), "teacher": str(teacher_path), "data": split.name},
            before, after, [n for n in (f"best epoch {result.best_epoch} of {cfg.epochs}",
                                        result.timing_note()) if n]))
        save_model(student, output, meta, force=force, inputs=inputs)
        if ckpt.exists():
            os.unlink(ckpt)
        stderr_console.print(
            f"best validation top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}); "
            f"saved {output}")
        _table(t_loaded, output, split, threads, fmt)
    if d.launched:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()

