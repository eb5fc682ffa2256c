"""Which parts of the search space apply to this model, found before the search starts.

A mobile net whose convolutions are all 1x1 or depthwise has nothing to swap; a model
torch-pruning cannot trace cannot be pruned structurally; a model may not export to ONNX or
quantize to int8. Each is found by a dry run of the method on the input model (the swap's
own test of which convs it would replace, one prune at the first grid level, one export and
one static quantization of the input), and what fails is left out of the space with one line
saying why, instead of failing every candidate that uses it.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .candidates import Context
from .errors import TorchslimError
from .swap import SwapConfig, _why_not, swappable_convs

INT8_KINDS = ("int8", "int8-mixed", "qat")


@dataclass
class Space:
    """The search space left after the dry runs, and why each part was left out."""

    swaps: tuple[str, ...]
    max_prune: float
    precisions: tuple[str, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def applicable(ctx: Context, swaps, max_prune: float, first_ratio: float,
               precisions) -> Space:
    """Dry-run each method on the input model; drop what does not apply, with a note."""
    space = Space(tuple(swaps), max_prune, tuple(precisions))
    if any(s != "none" for s in space.swaps):
        why = _unswappable(ctx.teacher)
        if why:
            space.swaps = tuple(s for s in space.swaps if s == "none")
            space.notes.append(f"{why}: the swap is left out of the search")
    if space.max_prune > 0:
        why = _unprunable(ctx, first_ratio)
        if why:
            space.max_prune = 0.0
            space.notes.append(f"{why}: pruning is left out of the search")
    space.precisions = _exportable(ctx, space, list(space.precisions))
    if not space.precisions:
        raise TorchslimError(
            f"no precision the search tries can be written as {ctx.suffix} ("
            f"{'; '.join(space.notes)}); try -o model.pt (fp32/fp16 in torch)")
    return space


def _unswappable(model: nn.Module) -> str | None:
    cfg = SwapConfig(conv="depthwise-separable")
    if swappable_convs(model, cfg):
        return None
    total = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if not total:
        return "no convolution"
    return f"no standard KxK convolution ({total} Conv2d: {_why_not(model, cfg)})"


def _unprunable(ctx: Context, ratio: float) -> str | None:
    from .measure import count_params
    from .prune import PruneConfig, prune_model

    try:
        pruned, _ = prune_model(ctx.teacher, PruneConfig(ratio=ratio, seed=ctx.seed),
                                ctx.data.head(1))
    except Exception as exc:  # torch-pruning raises many types; its reason is what matters
        return f"cannot prune structurally ({_reason(exc)})"
    if count_params(pruned)[0] >= count_params(ctx.teacher)[0]:
        return f"nothing to prune structurally (pruning {ratio:g} removed no parameter)"
    return None


def _exportable(ctx: Context, space: Space, precisions: list[str]) -> tuple[str, ...]:
    if ctx.suffix == ".onnx":
        why = _dry(lambda tmp: _export(ctx, tmp))
        if why:
            space.notes.append(f"the model does not export to ONNX ({why}): nothing can be "
                               "written as .onnx")
            return ()
        if any(p in INT8_KINDS for p in precisions):
            why = _dry(lambda tmp: _int8(ctx, tmp))
            if why:
                precisions = [p for p in precisions if p not in INT8_KINDS]
                space.notes.append(f"static int8 fails on this model ({why}): int8 is left "
                                   "out of the search")
    elif "fp16" in precisions:
        why = _dry(lambda _tmp: _fp16(ctx))
        if why:
            precisions = [p for p in precisions if p != "fp16"]
            space.notes.append(f"fp16 does not run on this model ({why}): fp16 is left out "
                               "of the search")
    return tuple(precisions)


def _dry(fn) -> str | None:
    with tempfile.TemporaryDirectory(prefix="torchslim-dry-") as tmp:
        try:
            fn(Path(tmp))
        except Exception as exc:  # exporters and quantizers raise many types
            return _reason(exc)
    return None


def _export(ctx: Context, tmp: Path) -> None:
    from .onnx_quant import export_onnx

    export_onnx(copy.deepcopy(ctx.teacher).float().eval(), ctx.meta.input_spec(),
                tmp / "dry.onnx")


def _int8(ctx: Context, tmp: Path) -> None:
    from .quantize import QuantizeConfig, quantize_model

    cfg = QuantizeConfig(mode="static", calib_batches=1, seed=ctx.seed)
    quantize_model(ctx.teacher, cfg, out_path=tmp / "dry-int8.onnx", data=ctx.data,
                   meta=copy.deepcopy(ctx.meta), inputs=ctx.meta.input_spec())


def _fp16(ctx: Context) -> None:
    model = copy.deepcopy(ctx.teacher).half().eval()
    with torch.no_grad():
        model(*[x.half() if x.is_floating_point() else x for x in ctx.data.head(2)])


def _reason(exc: BaseException) -> str:
    """The first line of an error, short enough for one line of output."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
