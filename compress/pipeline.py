"""`compress`: method configs run in the order that makes sense, measured after every step.

swap / low-rank (architecture) -> prune (structure) -> distill (recover accuracy, with the
input model as teacher) -> quantize (precision, always last). Each step calls its method's
own function; nothing here re-implements a method.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agreement import fidelity
from .artifact import write_model
from .config import config_to_dict
from .device import TrainDevice
from .distill import distill
from .errors import TorchslimError, UsageError
from .inputs import InputSpec, resolve
from .io import (
    WRITTEN,
    LoadedModel,
    check_output,
    history_entry,
    load_model,
    save_model,
    write_error,
)
from .lowrank import lowrank_model
from .measure import measure
from .prune import prune_model
from .quantize import quantize_model
from .swap import swap_model

STAGE = {"swap": 0, "lowrank": 0, "prune": 1, "distill": 2, "quantize": 3}
ORDER_TEXT = "swap/lowrank -> prune -> distill -> quantize"
NEEDS_DATA = {"static", "qat"}
HISTORY_KEYS = ("params", "nonzero_params", "macs", "file_bytes", "accuracy")


@dataclass
class StepOutcome:
    label: str  # "input", "swap", "prune", ...
    artifact: Path
    record: dict[str, Any]  # Measurement.to_dict(), plus fidelity keys without data
    notes: list[str] = field(default_factory=list)


@dataclass
class Hooks:
    """How the pipeline talks to its caller; every hook is optional."""

    stage: Callable[[str], None] | None = None  # a phase starts
    step: Callable[[StepOutcome], None] | None = None  # a row was measured
    training: Callable[[str], AbstractContextManager] | None = None  # yields train Callbacks


@dataclass
class PipelineResult:
    steps: list[StepOutcome]
    output: Path
    fp32_output: Path | None  # the last fp32 .pt, kept beside a quantized output
    warnings: list[str]
    # the input in other runtimes (fp32 ONNX Runtime), for "x faster vs fastest fp32"
    baselines: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """The table: the input in eager torch, then in ONNX Runtime, then every step."""
        records = [s.record for s in self.steps]
        return [*records[:1], *self.baselines, *records[1:]]


def order_steps(configs: list) -> list:
    """Flags may come in any order; run them in stage order (stable within a stage)."""
    return sorted(configs, key=lambda c: STAGE[c.method])


def check_plan(configs: list, *, has_data: bool) -> list[str]:
    """Reject an invalid pipeline before any work; return warnings worth showing."""
    if not configs:
        raise UsageError(
            "no steps to run: give --swap, --act, --prune, --target-macs, --distill, "
            "--quantize or --recipe"
        )
    for prev, cur in zip(configs, configs[1:], strict=False):
        if STAGE[cur.method] < STAGE[prev.method]:
            raise TorchslimError(
                f"step {cur.method!r} cannot come after {prev.method!r}: steps run "
                f"{ORDER_TEXT}; reorder the recipe"
            )
    if sum(c.method == "quantize" for c in configs) > 1:
        raise TorchslimError("only one quantize step is possible, and it must be the last")
    if not has_data:
        _check_data_free(configs)
        return ["no --data: steps are not recovered by training, and fidelity to the input "
                "model (top-1 agreement on generated inputs) stands in for accuracy"]
    changes = any(STAGE[c.method] < 2 for c in configs)
    if changes and not any(c.method == "distill" for c in configs):
        return ["the architecture changes but no --distill step recovers accuracy; "
                "add --distill"]
    return []


def _check_data_free(configs: list) -> None:
    for c in configs:
        if c.method == "distill":
            raise TorchslimError("--distill trains the compressed model: it needs --data")
        if c.method == "quantize" and c.mode in NEEDS_DATA:
            raise TorchslimError(
                f"--quantize {c.mode} calibrates on real images: add --data, or use "
                "dynamic, weight-only or fp16"
            )
        if c.method == "prune" and c.importance == "taylor":
            raise TorchslimError("taylor importance needs gradients: add --data, or use l2")


def output_suffixes(configs: list) -> tuple[str, ...]:
    """What the pipeline can write: a quantize step's own kind, else any model file kind."""
    last = configs[-1] if configs else None
    if last is not None and last.method == "quantize":
        return (last.suffix,)
    from .artifact import MODEL_SUFFIXES

    return MODEL_SUFFIXES


def check_output_suffix(output: Path, configs: list) -> None:
    allowed = output_suffixes(configs)
    if output.suffix.lower() not in allowed:
        kinds = " or ".join(f"model{s}" for s in allowed)
        what = f"a {allowed[0]} file" if len(allowed) == 1 else f"{'/'.join(allowed)} files"
        raise UsageError(f"this pipeline writes {what}; name -o like {kinds}")


def run_pipeline(
    loaded: LoadedModel,
    configs: list,
    output: Path,
    *,
    data=None,
    threads: int | None = None,
    min_run_time: float | None = None,
    force: bool = False,
    hooks: Hooks | None = None,
    inputs: InputSpec | None = None,
    device: TrainDevice | None = None,
) -> PipelineResult:
    """Run ``configs`` on ``loaded``; write the final artifact to ``output`` atomically.

    ``inputs`` states the model's inputs when neither the file nor the data does. Without
    a quantize step the output may be .pt, .onnx (fp32, self-contained) or .pt2.
    ``device`` says where the distill steps train (it overrides the recipe's); every step
    is measured on the CPU.
    """
    hooks = hooks or Hooks()
    warnings = check_plan(configs, has_data=data is not None)
    check_output_suffix(output, configs)
    check_output(output, force=force, inputs=[loaded.path])
    quantized = configs[-1].method == "quantize"
    fp32_out = fp32_companion(output) if quantized and output.suffix == ".onnx" else None
    if fp32_out is not None:
        check_output(fp32_out, force=force, inputs=[loaded.path])
    run = _Run(loaded, data, threads, min_run_time, hooks, inputs)
    run.device = device
    try:  # in the output's folder, so the final rename is atomic; removed on any exit
        workdir = tempfile.TemporaryDirectory(prefix=".torchslim-", dir=output.parent)
    except OSError as exc:
        raise write_error(output, exc) from exc
    with workdir as tmp:
        run.tmp = Path(tmp)
        run.measure_input()
        for i, cfg in enumerate(configs, 1):
            run.apply(i, cfg)
        run.finish(output, quantized)
        WRITTEN.append(output)
        if fp32_out is not None and run.last_pt is not None:
            os.replace(run.last_pt, fp32_out)
            WRITTEN.append(fp32_out)
    return PipelineResult(run.steps, output, fp32_out, warnings, run.baselines)


def fp32_companion(output: Path) -> Path:
    """Where a quantized pipeline keeps its last fp32 model, beside the int8 output."""
    return output.with_suffix(".fp32.pt")


class _Run:
    """The state one pipeline run carries from step to step."""

    def __init__(self, loaded: LoadedModel, data, threads, min_run_time, hooks: Hooks,
                 inputs: InputSpec | None = None):
        from .io import require_module

        self.teacher = copy.deepcopy(require_module(loaded, "compress")).float().eval()
        self.model = copy.deepcopy(self.teacher)
        self.loaded, self.data, self.hooks = loaded, data, hooks
        self.threads, self.min_run_time = threads, min_run_time
        self.meta = copy.deepcopy(loaded.meta)
        spec = resolve(inputs, self.meta.input_spec(), data.inputs if data else None,
                       model=self.model)
        if spec is None:
            raise TorchslimError("input shape unknown; pass --input-shape C,H,W (or --input "
                                 "SHAPE:DTYPE per input) or --data")
        self.spec = spec
        self.meta.set_input_spec(spec)
        if data is not None and not self.meta.class_names:
            self.meta.class_names = list(data.class_names)
        self.steps: list[StepOutcome] = []
        self.baselines: list[dict[str, Any]] = []
        self.tmp: Path | None = None
        self.last_pt: Path | None = None
        self.device: TrainDevice | None = None  # where distill steps train

    # -- measuring ----------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.hooks.stage:
            self.hooks.stage(text)

    def _measure(self, label: str, target: LoadedModel, notes: list[str]) -> StepOutcome:
        self._say(f"measuring {label}")
        rec = measure(target, name=label, inputs=self.spec, data=self.data,
                      threads=self.threads, min_run_time=self.min_run_time).to_dict()
        if self.data is None:
            rec.update(fidelity(self.teacher, target, self.spec))
        outcome = StepOutcome(label, target.path, rec, notes)
        self.steps.append(outcome)
        if self.hooks.step:
            self.hooks.step(outcome)
        return outcome

    def _saved(self, path: Path) -> LoadedModel:
        """The model just written to ``path``, measured as the file it is: torchslim files
        of torch classes are reloaded (proving they load); one that holds the user's own
        classes is measured in memory, since reloading it would run their code again."""
        if self.meta.requires:
            size = path.stat().st_size
            return LoadedModel(copy.deepcopy(self.model).eval(), "torchslim", path,
                               copy.deepcopy(self.meta), size)
        return load_model(path)

    def measure_input(self) -> None:
        if self.loaded.kind == "torchslim":
            target, notes = self.loaded, []
        else:
            path = save_model(self.model, self.tmp / "step0-input.pt", self.meta)
            target, notes = self._saved(path), [f"converted from a {self.loaded.kind} file"]
        self._measure("input", target, notes)
        self._measure_baseline(target)

    def _measure_baseline(self, target: LoadedModel) -> None:
        """The input in ONNX Runtime too, so a speed-up can be read against the fastest fp32
        runtime and not only eager torch. A model that does not export still compresses."""
        from .baselines import measure_runtimes

        self._say("measuring input in onnxruntime (fp32 export)")
        try:
            (rec,) = measure_runtimes(
                target, "onnxruntime", name="input", inputs=self.spec, data=self.data,
                threads=self.threads, min_run_time=self.min_run_time, use_cache=False)
        except TorchslimError as exc:
            self.steps[0].notes.append(f"fp32 ONNX Runtime baseline not measured: {exc}")
            return
        self.baselines.append(rec.to_dict())

    # -- steps --------------------------------------------------------------------------
    def apply(self, i: int, cfg) -> None:
        label = cfg.method
        self._say(f"step {i}: {label}")
        before = {k: self.steps[-1].record.get(k) for k in HISTORY_KEYS}
        if cfg.method in ("distill", "quantize") and self.device is not None:
            cfg = dataclasses.replace(cfg, **self.device.train_kwargs())  # qat fine-tunes
        if cfg.method == "quantize":
            self._quantize(i, cfg, before)
            return
        notes = getattr(self, f"_{cfg.method}")(cfg)
        entry = history_entry(cfg.method, config_to_dict(cfg), before, {}, notes)
        self.meta.history.append(entry)
        path = self.tmp / f"step{i}-{label}.pt"
        save_model(self.model, path, self.meta)
        outcome = self._measure(label, self._saved(path), notes)
        entry["after"] = {k: outcome.record.get(k) for k in HISTORY_KEYS}
        save_model(self.model, path, self.meta, force=True)  # now with the measured numbers
        outcome.record["file_bytes"] = path.stat().st_size
        self.last_pt = path

    def finish(self, output: Path, quantized: bool) -> None:
        """Move the last artifact to ``output``, converting an fp32 .pt to .onnx/.pt2."""
        last = self.steps[-1]
        if quantized or output.suffix.lower() == ".pt":
            os.replace(last.artifact, output)
        else:
            tmp = self.tmp / f"final{output.suffix}"
            write_model(self.model, tmp, copy.deepcopy(self.meta), spec=self.spec)
            os.replace(tmp, output)
            last.record["file_bytes"] = output.stat().st_size
            last.notes.append(f"written as {output.suffix}: needs no Python code to load")
        last.artifact = output

    def _swap(self, cfg) -> list[str]:
        example = self.data.head(256) if self.data is not None else None
        self.model, report = swap_model(self.model, cfg, example)
        return list(report.notes) + [
            f"{lay.name}: relative error {lay.rel_error:.3f}" for lay in report.layers
            if getattr(lay, "rel_error", None) is not None
        ][:20]

    def _lowrank(self, cfg) -> list[str]:
        self.model, report = lowrank_model(self.model, cfg)
        return list(report.notes)

    def _prune(self, cfg) -> list[str]:
        example = self.data.head(1) if self.data is not None else self.spec.example(1)
        self.model, report = prune_model(self.model, cfg, example, data=self.data,
                                         on_stage=self._say)
        ratio = f"channel ratio {report.ratio:.3f}" if report.ratio is not None else None
        return [n for n in [ratio, *report.notes] if n]

    def _distill(self, cfg) -> list[str]:
        ctx = self.hooks.training("recovering by distillation") if self.hooks.training \
            else nullcontext(None)
        with ctx as callbacks:
            self.model, result = distill(self.teacher, self.model, self.data, cfg, callbacks)
        self.model.eval()
        notes = [f"best validation top-1 {result.best_top1:.2f}% at epoch {result.best_epoch}",
                 result.timing_note()]
        return [n for n in notes if n]

    def _quantize(self, i: int, cfg, before: dict) -> None:
        path = self.tmp / f"step{i}-quantize{cfg.suffix}"
        res = quantize_model(self.model, cfg, out_path=path, data=self.data,
                             meta=copy.deepcopy(self.meta), inputs=self.spec)
        notes = list(res.notes) + [f"kept in fp32: {f}" for f in res.fallbacks]
        self.meta = res.meta
        self._measure("quantize", load_model(res.path, trust=bool(self.meta.requires)), notes)
