"""`torchslim train`: train a registry model on real data, so every method has a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..compress.device import TrainDevice
from ..compress.io import ModelMeta, check_output, history_entry, save_model
from ..compress.measure import count_macs, count_params
from ..compress.train import TrainConfig, fit
from ..models.registry import arch_spec, create_model, model_info
from .common import (
    ChannelsOpt,
    DataOpt,
    ForceOpt,
    OutOpt,
    SeedOpt,
    TrainLimitOpt,
    command,
    fit_progress,
    open_data,
    stderr_console,
    train_options,
)
from .render import fmt_bytes, fmt_count, safe_markup


def train_registry_model(arch: str, data, cfg: TrainConfig, title: str | None = None):
    """Build ``arch`` for ``data``'s shape and classes, train it; returns (model, meta, fit)."""
    import torch

    c, h, w = data.input_shape
    torch.manual_seed(cfg.seed)
    model = create_model(arch, num_classes=data.num_classes, in_channels=c, input_size=(h, w))
    with fit_progress(title or f"training {arch}") as cb:
        result = fit(model, data, cfg, callbacks=cb)
    notes = [f"best epoch {result.best_epoch} of {cfg.epochs}", result.timing_note()]
    params = count_params(model)[0]
    macs = count_macs(model, torch.zeros(1, c, h, w))
    spec = arch_spec(arch, num_classes=data.num_classes, in_channels=c, input_size=(h, w))
    cfg_dict = {"arch": arch, "data": data.name, **cfg.__dict__}
    after = {"params": params, "macs": macs, "accuracy": result.best_top1}
    meta = ModelMeta(
        arch=spec,
        input_shape=data.input_shape,
        class_names=data.class_names,
        history=[history_entry("train", cfg_dict, {}, after, [n for n in notes if n])],
    )
    return model, meta, result


def _too_small(shape, min_size) -> bool:
    return len(shape) != 3 or shape[1] < min_size[0] or shape[2] < min_size[1]


TRAIN_SIZE_HELP = ("Resize images to H,W. Default: the data's own size, or the model's input "
                   "size (`torchslim models`) when the data is smaller than the model takes.")


def register(app: typer.Typer) -> None:
    @command(
        app,
        "train",
        epilog="Example: torchslim train pd --data digits --image-size 60,120 --epochs 15 "
        "-o pd.pt",
    )
    @train_options
    def train_cmd(
        arch: Annotated[str, typer.Argument(help="Registry model name (`torchslim models`).")],
        output: OutOpt,
        data: DataOpt = "digits",
        image_size: Annotated[str | None, typer.Option(help=TRAIN_SIZE_HELP)] = None,
        channels: ChannelsOpt = None,
        epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
        lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 3e-3,
        batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
        augment: Annotated[bool, typer.Option(help="Random-shift augmentation.")] = True,
        train_limit: TrainLimitOpt = None,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        accel: TrainDevice = None,
    ) -> None:
        """Train a registry model on --data and save it as a torchslim .pt with its history."""
        check_output(output, force=force)
        info = model_info(arch)  # an unknown name fails here, before any data is loaded
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=augment,
                          **accel.train_kwargs())
        split = open_data(data, image_size=image_size, channels=channels, seed=seed,
                              train_limit=train_limit)
        if image_size is None and _too_small(split.input_shape, info["min_size"]):
            size = ",".join(map(str, info["input_size"]))
            stderr_console.print(f"[dim]{split.name} images are smaller than {info['name']} "
                                 f"takes; resized to its input size {size}[/]")
            split = open_data(data, image_size=size, channels=channels, seed=seed,
                              train_limit=train_limit)
        stderr_console.print(f"[dim]{safe_markup(split.describe())}[/]")
        model, meta, result = train_registry_model(arch, split, cfg)
        save_model(model, Path(output), meta, force=force)
        size = Path(output).stat().st_size
        typer.echo(
            f"{arch}: best validation top-1 {result.best_top1:.2f}% (epoch {result.best_epoch}), "
            f"{fmt_count(meta.history[0]['after']['params'])} params, "
            f"{fmt_count(meta.history[0]['after']['macs'])} MACs, saved {output} "
            f"({fmt_bytes(size)})"
        )
