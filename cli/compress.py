"""`torchslim compress`: the whole job in one command, one measured row per step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from ..compress.device import TrainDevice
from ..compress.distill import DistillConfig
from ..compress.io import LoadOptions, atomic_write, check_output, require_module
from ..compress.pipeline import (
    Hooks,
    check_output_suffix,
    check_plan,
    fp32_companion,
    order_steps,
    run_pipeline,
)
from ..compress.prune import PruneConfig
from ..compress.quantize import QuantizeConfig
from ..compress.recipe import dump_recipe, load_recipe
from ..compress.swap import SwapConfig
from .common import (
    ChannelsOpt,
    DataOpt,
    ForceOpt,
    ImageSizeOpt,
    OutOpt,
    SeedOpt,
    ThreadsOpt,
    TrainLimitOpt,
    command,
    fit_progress,
    model_options,
    open_data,
    open_model,
    stderr_console,
    stdout_console,
    train_options,
)
from .render import render_text, rich_table, safe_markup

EPILOG = (
    "Examples:\n\n"
    "  torchslim compress pd.pt -o pd-slim.onnx --data digits --swap --act hard "
    "--target-macs 0.5 --distill --quantize static\n\n"
    "  torchslim compress pd.pt -o pd-fp16.pt --quantize fp16   (data-free)\n\n"
    "  torchslim compress pd.pt -o out.onnx --data digits --recipe slim.toml\n\n"
    "  torchslim compress model.pt --trust --data mine.npz --swap --prune 0.4 --distill "
    "-o small.onnx   (your own class; .onnx/.pt2 need no Python code to load)\n\n"
    "Steps run swap -> prune -> distill -> quantize, whatever the flag order.\n\n"
    "Say the goal instead (search, Pareto front, exit 1 if it cannot be met):\n\n"
    "  torchslim compress pd.pt -o pd-slim.onnx --data digits --max-acc-drop 0.5 "
    "--objective size --time-budget 15m --workdir search-pd\n\n"
    "With --max-acc-drop, method flags bound the search (--prune R: at most R; --quantize "
    "static: fp32 or int8) and --recipe measures exactly that recipe against the goal."
)


def flags_to_configs(*, swap, act, lowrank, prune, target_macs, importance, round_to,
                     distill, epochs, lr, temperature, alpha, quantize, calib_batches,
                     seed) -> list:
    """Command-line flags -> the same config objects the single-method commands use."""
    configs = []
    if swap or act or lowrank:
        configs.append(SwapConfig(
            conv="depthwise-separable" if swap else "none", act=act or "none",
            linear="low-rank" if lowrank else "none", rank_ratio=lowrank or 0.25))
    if prune is not None or target_macs is not None:
        configs.append(PruneConfig(ratio=prune, target_macs=target_macs,
                                   importance=importance, round_to=round_to, seed=seed))
    if distill:
        configs.append(DistillConfig(epochs=epochs, lr=lr, temperature=temperature, seed=seed,
                                     **({} if alpha is None else {"alpha": alpha})))
    if quantize:
        configs.append(QuantizeConfig(mode=quantize, calib_batches=calib_batches, seed=seed))
    return order_steps(configs)


class _LiveTable:
    """A rich table on stderr that grows one row per finished step."""

    def __init__(self):
        self.rows: list[dict] = []
        self.live = Live(rich_table([]), console=stderr_console, auto_refresh=False)

    def step(self, outcome) -> None:
        self.rows.append(outcome.record)
        self.live.update(rich_table(self.rows, title="torchslim compress"), refresh=True)

    @contextmanager
    def shown(self) -> Iterator[None]:
        try:
            with self.live:
                yield
        finally:
            if not stderr_console.is_terminal:  # rich ends a piped Live mid-line
                stderr_console.line()

    def stage(self, text: str) -> None:
        stderr_console.print(f"[dim]→ {safe_markup(text)}[/]", highlight=False)

    def __enter__(self) -> _LiveTable:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)
        if not stderr_console.is_terminal:  # rich ends the table with a newline only on a
            stderr_console.line()  # terminal; in a log the next line was glued to it


def report_paths(output: Path) -> tuple[Path, Path]:
    """The markdown and JSON reports written beside the output."""
    # with_name, not with_suffix: "model-v1.2.onnx" keeps its "v1.2"
    return (output.with_name(f"{output.stem}.report.md"),
            output.with_name(f"{output.stem}.report.json"))


def _write_reports(result, rows: list[dict], force: bool) -> list[Path]:
    md, js = report_paths(result.output)
    steps = [{"step": s.label, "artifact": str(s.artifact), "notes": s.notes, **s.record}
             for s in result.steps]
    atomic_write(md, lambda p: p.write_text(render_text(rows, "markdown") + "\n"), force=force)
    atomic_write(js, lambda p: p.write_text(json.dumps(steps, indent=2, default=str)),
                 force=force)
    return [md, js]


def register(app: typer.Typer) -> None:
    @command(app, "compress", epilog=EPILOG)
    @model_options
    @train_options
    def compress_cmd(
        model: Annotated[Path, typer.Argument(help="Model file to compress.")],
        output: OutOpt,
        data: DataOpt = None,
        swap: Annotated[bool, typer.Option(
            "--swap", help="Standard KxK convs -> depthwise-separable (SVD-initialised).")] = False,
        act: Annotated[str | None, typer.Option(
            help="Activation swap: hard (MobileNetV3 hard-sigmoid/swish) or relu6.")] = None,
        lowrank: Annotated[float | None, typer.Option(
            help="Factorise Linear layers by truncated SVD, keeping this rank ratio.")] = None,
        prune: Annotated[float | None, typer.Option(
            help="Structured pruning: fraction of channels to remove.")] = None,
        target_macs: Annotated[float | None, typer.Option(
            help="Structured pruning to this fraction of the MACs (e.g. 0.5).")] = None,
        importance: Annotated[str, typer.Option(help="Pruning importance.")] = "l2",
        round_to: Annotated[int | None, typer.Option(help="Channel multiple.")] = None,
        distill: Annotated[bool, typer.Option(
            "--distill", help="Recover accuracy by distillation from the input model.")] = False,
        epochs: Annotated[int, typer.Option(help="Distillation epochs.")] = 15,
        lr: Annotated[float, typer.Option(help="Distillation learning rate.")] = 3e-3,
        temperature: Annotated[float, typer.Option(help="KD temperature.")] = 4.0,
        alpha: Annotated[float | None, typer.Option(
            help="KD soft-loss weight (default 0.7; with --max-acc-drop 0.3).")] = None,
        quantize: Annotated[str | None, typer.Option(
            help="static | dynamic | weight-only | fp16 | bf16 | qat")] = None,
        calib_batches: Annotated[int, typer.Option(help="Calibration batches.")] = 8,
        recipe: Annotated[Path | None, typer.Option(
            help="Steps from a .toml/.yaml/.json recipe instead of flags.")] = None,
        dump_recipe_to: Annotated[Path | None, typer.Option(
            "--dump-recipe", help="Write the resolved recipe, to repeat this run exactly.")] = None,
        image_size: ImageSizeOpt = None,
        channels: ChannelsOpt = None,
        threads: ThreadsOpt = None,
        min_time: Annotated[float | None, typer.Option(help="Seconds of timing per batch.")] = None,
        train_limit: TrainLimitOpt = None,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        max_acc_drop: Annotated[float | None, typer.Option(
            help="Goal: lose at most this many top-1 points (held-out test); searches "
                 "swap x prune x distill x precision for the best model within it.")] = None,
        objective: Annotated[str, typer.Option(
            help="With --max-acc-drop: minimise size | latency | macs.")] = "size",
        target_size: Annotated[str | None, typer.Option(
            help="With --max-acc-drop: file at most this fraction of the input (1/20).")] = None,
        target_size_kb: Annotated[float | None, typer.Option(
            help="With --max-acc-drop: file at most this many KB.")] = None,
        target_latency_ms: Annotated[float | None, typer.Option(
            help="With --max-acc-drop: batch-1 latency at most this (ms).")] = None,
        target_speedup: Annotated[float | None, typer.Option(
            help="With --max-acc-drop: at least this much faster than the input.")] = None,
        time_budget: Annotated[str | None, typer.Option(
            help="Search time budget, e.g. 15m; the best so far is kept.")] = None,
        trials: Annotated[int | None, typer.Option(
            help="Stop after this many candidates are measured.")] = None,
        workdir: Annotated[Path | None, typer.Option(
            help="Keep candidates here; rerunning with it resumes the search.")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Print the search space and a time estimate, then stop.")] = False,
        strategy: Annotated[str, typer.Option(
            help="Search strategy: staged (default) or optuna (needs optuna).")] = "staged",
        load: LoadOptions = None,
        accel: TrainDevice = None,
    ) -> None:
        """Compress MODEL in one pipeline and report every step side by side."""
        if max_acc_drop is not None:
            from .goal import run_goal

            run_goal(dict(locals()))
            return
        flagged = flags_to_configs(
            swap=swap, act=act, lowrank=lowrank, prune=prune, target_macs=target_macs,
            importance=importance, round_to=round_to, distill=distill, epochs=epochs, lr=lr,
            temperature=temperature, alpha=alpha, quantize=quantize,
            calib_batches=calib_batches, seed=seed)
        if recipe is not None and flagged:
            raise _usage("give steps either as flags or as --recipe, not both")
        configs = load_recipe(recipe) if recipe is not None else flagged
        # everything that can be wrong with the plan fails here, before any work
        warnings = check_plan(configs, has_data=data is not None)
        check_output_suffix(output, configs)
        companion = fp32_companion(output) if output.suffix == ".onnx" and \
            configs[-1].method == "quantize" else None
        for path in (output, companion, *report_paths(output), dump_recipe_to):
            if path is not None:
                check_output(path, force=force, inputs=[model, recipe])
        loaded = open_model(model, load)
        require_module(loaded, "compress")  # TorchScript/ONNX fail here, before any output
        for w in warnings:
            stderr_console.print(f"[yellow]warning:[/] {safe_markup(w)}")
        split = (open_data(data, image_size=image_size, channels=channels, seed=seed,
                           like=loaded, train_limit=train_limit) if data else None)
        if dump_recipe_to is not None:
            dump_recipe(configs, dump_recipe_to, force=force)
        table = _LiveTable()
        hooks = Hooks(stage=table.stage, step=table.step, training=fit_progress)
        with table.shown():
            result = run_pipeline(loaded, configs, output, data=split, threads=threads,
                                  min_run_time=min_time, force=force, hooks=hooks,
                                  inputs=load.inputs, device=accel)
        rows = result.rows()  # the input in each runtime first: the speed-ups' baselines
        reports = _write_reports(result, rows, force)
        stdout_console.print(rich_table(rows, title=f"torchslim compress: {model.name}"))
        written = [result.output, *([result.fp32_output] if result.fp32_output else []),
                   *reports]
        stderr_console.print("wrote " + ", ".join(safe_markup(p) for p in written))


def _usage(message: str):
    from ..compress.errors import UsageError

    return UsageError(message)
