"""Sensitivity analysis: prune each layer group alone, see what accuracy it costs.

The scan answers "which layers can lose channels cheaply?" and feeds per-layer ratios
back into :func:`torchslim.compress.prune.prune_model` (``--from-sensitivity``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import TorchslimError
from .io import atomic_write
from .prune import PruneConfig, _build_graph, _Plan, make_plan, prune_copy, recalibrate_bn
from .train import evaluate

FORMAT = "torchslim-sensitivity/1"


@dataclass
class SensitivityResult:
    """Validation top-1 (%) after pruning one layer group at each ratio (BatchNorm
    statistics re-estimated, no fine-tuning)."""

    ratios: list[float]
    baseline: float
    layers: list[str]  # the module that roots each group (keys for pruning ratios)
    channels: dict[str, int]  # channels of each group before pruning
    accuracy: dict[str, list[float | None]]  # None: that ratio would empty the layer
    importance: str = "l2"

    def drop(self, layer: str) -> list[float | None]:
        return [None if a is None else self.baseline - a for a in self.accuracy[layer]]

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityResult:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TorchslimError(
                "not a torchslim sensitivity file; create one with `torchslim sensitivity`"
            )
        d = {k: v for k, v in d.items() if k != "format"}
        try:
            return cls(**d)
        except TypeError as exc:
            raise TorchslimError(f"sensitivity file is damaged ({exc}); run it again") from None


def prunable_layers(model: nn.Module, example: torch.Tensor, plan: _Plan) -> dict[str, int]:
    """Root module name -> channels, for every group the pruner would consider."""
    dg = _build_graph(model.eval(), example, plan.ignored)
    modules = [m for m in plan.ignored if isinstance(m, nn.Module)]
    ignored = [s for m in modules for s in m.modules()]
    out: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roots = (nn.modules.conv._ConvNd, nn.Linear)
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=roots):
            root = group[0][0].target.module
            out[dg._module2name[root]] = dg.get_out_channels(root)
    return out


def scan(
    model: nn.Module,
    data,
    example: torch.Tensor,
    ratios: Sequence[float],
    *,
    importance: str = "l2",
    ignore: Sequence[str] = (),
    on_progress: Callable[[str, float], None] | None = None,
) -> SensitivityResult:
    """Prune every layer group alone at every ratio (on copies) and measure val top-1."""
    ratios = sorted(float(r) for r in ratios)
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise TorchslimError(f"--ratios must lie in (0, 1), got {r}; e.g. 0.1,0.3,0.5,0.7")
    if importance == "taylor":
        raise TorchslimError("sensitivity ranks by weights; use l1, l2, lamp, fpgm or bn-scale")
    model = model.eval()
    plan = make_plan(model, example, tuple(ignore))
    layers = prunable_layers(model, example, plan)
    if not layers:
        raise TorchslimError("this model has no prunable layer groups (all ignored or skipped)")
    cfg = PruneConfig(layer_ratios={next(iter(layers)): ratios[0]}, importance=importance)
    acc = {name: [] for name in layers}
    for name in layers:
        for r in ratios:
            if on_progress:
                on_progress(name, r)
            acc[name].append(_accuracy_at(model, example, cfg, plan, {name: r}, data))
    return SensitivityResult(
        ratios=ratios,
        baseline=evaluate(model, data.val)[0],
        layers=list(layers),
        channels=layers,
        accuracy=acc,
        importance=importance,
    )


def _accuracy_at(model, example, cfg, plan, ratios, data) -> float | None:
    try:
        pruned = prune_copy(model, example, cfg, plan, 0.0, ratios)
    except TorchslimError:  # the ratio would remove every channel of this layer
        return None
    recalibrate_bn(pruned, data)  # as prune does before it measures or fine-tunes
    return evaluate(pruned, data.val)[0]


def pick_ratios(result: SensitivityResult, max_drop: float) -> dict[str, float]:
    """Per layer, the largest scanned ratio whose accuracy drop is <= max_drop points."""
    if max_drop < 0:
        raise TorchslimError(f"--max-drop must be >= 0 (accuracy points), got {max_drop}")
    picked: dict[str, float] = {}
    for layer in result.layers:
        ok = [r for r, d in zip(result.ratios, result.drop(layer), strict=True)
              if d is not None and d <= max_drop]
        if ok:
            picked[layer] = max(ok)
    if not picked:
        raise TorchslimError(
            f"no layer stays within --max-drop {max_drop} at any scanned ratio; "
            "raise --max-drop or scan smaller --ratios"
        )
    return picked


def load(path: str | Path) -> SensitivityResult:
    path = Path(path)
    try:
        return SensitivityResult.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise TorchslimError(f"sensitivity file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TorchslimError(f"cannot read sensitivity file {path}: {exc}") from None


def save(result: SensitivityResult, path, *, force=False, inputs=()) -> Path:
    text = json.dumps(result.to_dict(), indent=2)
    return atomic_write(path, lambda tmp: tmp.write_text(text), force=force, inputs=inputs)


def plot(result: SensitivityResult, path, *, force=False, inputs=()) -> Path:
    """PNG: accuracy-vs-ratio lines per layer beside a layer x ratio heat-map of the drop."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    n = len(result.layers)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(4, 0.35 * n + 2)))
    for layer in result.layers:
        ys = [float("nan") if a is None else a for a in result.accuracy[layer]]
        ax1.plot(result.ratios, ys, marker="o", label=layer)
    ax1.axhline(result.baseline, color="k", linestyle="--", label="unpruned")
    ax1.set(xlabel="pruning ratio (channels removed)", ylabel="val top-1 (%)",
            title="accuracy when one layer is pruned")
    ax1.legend(fontsize=7, loc="lower left")
    drops = [[float("nan") if d is None else d for d in result.drop(layer)]
             for layer in result.layers]
    im = ax2.imshow(drops, aspect="auto", cmap="Reds")
    ax2.set_xticks(range(len(result.ratios)), [f"{r:g}" for r in result.ratios])
    ax2.set_yticks(range(n), result.layers, fontsize=7)
    ax2.set(xlabel="pruning ratio", title="accuracy drop (points)")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        return atomic_write(path, write, force=force, inputs=inputs)
    finally:
        plt.close(fig)
