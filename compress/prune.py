"""Pruning: structured (channels, neurons, heads physically removed) and unstructured.

Structured pruning runs on torch-pruning's dependency graph, so coupled layers (residual
adds, depthwise convs, BatchNorm/LayerNorm, attention embeddings) shrink together and the
result is a plain ``nn.Module`` with smaller tensors: parameters, MACs, file size and
latency all fall. Unstructured pruning only zeroes weights; it is honest about that.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from . import measure
from . import prune_attention as attention
from .config import register_config
from .errors import TorchslimError
from .inputs import as_tuple, call, call_hooked

IMPORTANCES = ("l1", "l2", "taylor", "bn-scale", "lamp", "fpgm", "random")
UNSTRUCTURED_IMPORTANCES = ("l1", "l2", "random")
# Recurrent layers: torch-pruning cannot remove their hidden units correctly (its LSTM
# pruner mis-slices the 4-gate tensors and refuses stacked layers), so we keep them whole.
RECURRENT = (nn.RNNBase,)
# Channel counts are integers (and --round-to multiples), so MACs move in steps; a target
# missed by a hair (0.2506 for 0.25) should not force the next, much smaller, step.
MACS_TOLERANCE = 0.01


def _check_fraction(name: str, value: float, *, low_open: bool = False) -> None:
    ok = 0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0
    if not ok:
        rng = "0 < x < 1" if low_open else "0 <= x < 1"
        raise TorchslimError(f"{name} must be in {rng}, got {value}; e.g. {name} 0.5")


@register_config("prune")
@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to rank it. Exactly one of ratio / target_macs / layer_ratios."""

    ratio: float | None = None  # fraction of channels (or weights, unstructured) removed
    target_macs: float | None = None  # fraction of the original MACs to keep
    importance: str = "l2"
    global_pruning: bool = False  # rank all layers together instead of each layer alone
    steps: int = 1  # iterative pruning: reach the ratio in this many steps
    round_to: int | None = None  # keep channel counts multiples of this (SIMD/int8 kernels)
    ignore: tuple[str, ...] = ()  # module names never pruned (besides the classifier)
    unstructured: bool = False
    layer_ratios: dict[str, float] = field(default_factory=dict)  # name -> ratio
    seed: int = 0  # for random importance

    def __post_init__(self):
        chosen = [self.ratio is not None, self.target_macs is not None, bool(self.layer_ratios)]
        if sum(chosen) != 1:
            raise TorchslimError(
                "give exactly one of --ratio, --target-macs or --from-sensitivity"
            )
        if self.ratio is not None:
            _check_fraction("--ratio", self.ratio)
        if self.target_macs is not None:
            _check_fraction("--target-macs", self.target_macs, low_open=True)
        for name, r in self.layer_ratios.items():
            _check_fraction(f"ratio for layer {name!r}", r)
        allowed = UNSTRUCTURED_IMPORTANCES if self.unstructured else IMPORTANCES
        if self.importance not in allowed:
            raise TorchslimError(
                f"--importance {self.importance!r} is not available here; "
                f"choose one of {', '.join(allowed)}"
            )
        if self.steps < 1:
            raise TorchslimError(f"--steps must be >= 1, got {self.steps}")
        if self.round_to is not None and self.round_to < 1:
            raise TorchslimError(f"--round-to must be >= 1, got {self.round_to}")
        if self.layer_ratios and self.global_pruning:
            raise TorchslimError("per-layer ratios (--from-sensitivity) need --local ranking")
        if self.unstructured and (self.target_macs is not None or self.layer_ratios):
            raise TorchslimError(
                "--unstructured zeroes weights and saves no MACs; use --ratio with it"
            )


@dataclass
class PruneReport:
    """What a pruning run did, with measured numbers for the history entry."""

    ratio: float | None  # channel ratio applied (found by search for target_macs)
    before: dict[str, Any]
    after: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    pruned_top1: float | None = None  # accuracy right after pruning, before fine-tuning
    fit: Any = None  # train.FitResult of the fine-tuning, if any


# --- measuring ------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return measure.count_params(model)[0]


def count_nonzero(model: nn.Module) -> int:
    return measure.count_params(model)[1]


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass at the example's batch size."""
    return int(measure.count_macs(model, example))


def gzip_bytes(model: nn.Module) -> int:
    """Size of the fp32 state_dict after gzip: what zeroed weights buy on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(gzip.compress(buf.getvalue(), compresslevel=6))


# --- layers: names, classifier, what cannot be pruned ---------------------------------


def find_classifier(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The last layer with weights to run in a forward pass: its outputs are the classes."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if _own_params(m) and not any(True for _ in m.children())  # leaves: a container's
    ]  # hook fires after its children, so it would always look last
    call_hooked(model, example, hooks)
    return order[-1] if order else None


def resolve_layers(model: nn.Module, names) -> list[nn.Module]:
    """Modules by name; an unknown name is an error listing some valid ones."""
    named = dict(model.named_modules())
    unknown = [n for n in names if n not in named or n == ""]
    if unknown:
        valid = [n for n, m in named.items() if n and any(True for _ in m.parameters())]
        raise TorchslimError(
            f"no layer named {', '.join(map(repr, unknown))} in this model; valid names "
            f"include {', '.join(valid[:8])}{' ...' if len(valid) > 8 else ''}"
        )
    return [named[n] for n in names]


@dataclass
class _Plan:
    """Layers left alone, and why; shared by the pruner and the sensitivity scan."""

    ignored: list[Any]  # modules and parameters torch-pruning must not touch
    num_heads: dict[nn.Module, int]
    notes: list[str]
    attention: list[attention.AttentionSite] = field(default_factory=list)  # user-written
    out_shape: tuple | None = None  # the unpruned model's output shape


def _own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _unsupported_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with weights that torch-pruning has no pruner for (it would treat them as
    element-wise and silently mis-shape them), plus recurrent layers."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, RECURRENT):
            out.append((name, m))
        elif _own_params(m) and not any(True for _ in m.children()):
            # A container's own parameters (e.g. a position embedding) are fine: torch-
            # pruning prunes them as "unwrapped" tensors. A custom leaf layer is not, unless
            # its weights are vectors: a hand-written LayerNorm/scale over channels (as in
            # ConvNeXt) is pruned with its channels; kept whole, it broke the pruned model.
            if tp.ops.module2type(m) == tp.ops.OPTYPE.ELEMENTWISE and not _vectors_only(m):
                out.append((name, m))
    return out


def _vectors_only(m: nn.Module) -> bool:
    return all(p.dim() == 1 for p in m.parameters(recurse=False))


def make_plan(model: nn.Module, example: torch.Tensor, ignore=(), cfg=None) -> _Plan:
    """Decide what is ignored: the classifier, --ignore names, layers torch-pruning cannot
    handle (reported, not a crash), and attention head grouping. A copy pruned as ``cfg``
    asks (or at half width) must run: layers whose widths a forward fixes are kept whole."""
    ignored: list[Any] = list(resolve_layers(model, ignore))
    notes: list[str] = []
    clf = find_classifier(model, example)
    if clf is not None:
        ignored.append(clf)
    for name, m in _unsupported_leaves(model):
        ignored.append(m)
        if not isinstance(m, RECURRENT):  # keep its weights out of "unwrapped" pruning
            ignored.extend(m.parameters(recurse=False))
        notes.append(f"skipped {name} ({type(m).__name__}): its units cannot be pruned")
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name in _untraceable_roots(model, example, ignored, num_heads):
        ignored.append(dict(model.named_modules())[name])
        notes.append(f"skipped {name}: torch-pruning cannot trace its channel dependencies")
    tied = attention.coupled_roots(model, example, ignored)
    if tied:
        ignored.extend(resolve_layers(model, tied))
        notes.append(f"kept {', '.join(tied)} whole: coupled to the model's input, whose "
                     "width is fixed")
    plan = _Plan(ignored, num_heads, notes, attention.find_attention(model, example),
                 _output_shape(model, example))
    attention.keep_forward_working(model, example, plan.ignored, plan.notes,
                                   _trial(model, example, cfg, plan))
    return plan


def _trial(model, example, cfg, plan):
    """Prune a copy as the run will (l2 ranking: no gradients yet; half width when the
    ratio is still to be searched) and check that its forward runs."""
    cfg = cfg or PruneConfig(ratio=0.5)
    cfg = dataclasses.replace(cfg, importance="l2", steps=1, target_macs=None,
                              ratio=None if cfg.layer_ratios else cfg.ratio or 0.5)

    def trial(ignored):
        prune_copy(model, example, cfg, dataclasses.replace(plan, ignored=ignored),
                   cfg.ratio or 0.0, cfg.layer_ratios)

    return trial


def _build_graph(model, example, ignored):
    params = [p for p in ignored if isinstance(p, nn.Parameter)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, ignored_params=params, verbose=False
        )


def _untraceable_roots(model, example, ignored, num_heads) -> list[str]:
    """Names of layers whose pruning group torch-pruning fails to build (e.g. a Linear
    feeding a GRU) or builds wrong (indices past a layer's channels, as behind a channel
    shuffle): they are skipped instead of crashing the whole run."""
    try:
        dg = _build_graph(model.eval(), example, ignored)
    except Exception as exc:  # the graph itself cannot be traced: nothing can be pruned
        raise TorchslimError(
            f"torch-pruning cannot trace this model ({type(exc).__name__}: {exc}); "
            "structured pruning is not possible, try --unstructured"
        ) from exc
    bad, skip = [], {id(x) for x in ignored}
    for m in list(dg.module2node):
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or id(m) in skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels,
                                             list(range(dg.get_out_channels(m))))
        except Exception:
            bad.append(dg._module2name[m])
            continue
        if not _indices_fit(dg, group):
            bad.append(dg._module2name[m])
    return bad


def _indices_fit(dg, group) -> bool:
    """Whether every layer in ``group`` has the channels its indices name. torch-pruning
    maps indices through a view/transpose channel shuffle wrongly (ShuffleNet): such a
    group would fail in the importance step or mis-slice the layers it reaches."""
    for dep, idxs in group:
        if dg.get_pruner_of_module(dep.target.module) is None or not len(idxs):
            continue
        # through the graph, with the node: torch-pruning's pruners are shared objects whose
        # pruning_dim is set per call (asked directly, they answer for the last tensor seen)
        out = dg.is_out_channel_pruning_fn(dep.handler)
        size = dg.get_out_channels(dep.target) if out else dg.get_in_channels(dep.target)
        if size is not None and max(int(i) for i in idxs) >= size:
            return False
    return True


# --- structured pruning ---------------------------------------------------------------


def make_importance(name: str):
    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "bn-scale": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def rounded_prune_count(n_pruned: int, channels: int, round_to: int) -> int:
    """How many of ``channels`` to remove so the kept count is a multiple of ``round_to``.

    The kept count goes to the *nearest* multiple and never below one multiple; a layer of
    ``round_to`` channels or fewer is left whole. (torch-pruning rounds the kept count down,
    so ``--round-to 16`` on a 16-channel layer asked to lose 4 removed all 16.) The point of
    rounding is speed: a CPU kernel pads a layer to its SIMD block (16 fp32 lanes on
    AVX-512), so a layer cut from 16 to 8 channels costs nearly what it did.
    """
    if channels <= round_to:
        return 0
    keep = max(round_to, int((channels - n_pruned) / round_to + 0.5) * round_to)
    return channels - min(keep, channels)


class _RoundingPruner(tp.pruner.BasePruner):
    def _round_to(self, n_pruned, current_channels, round_to):
        return rounded_prune_count(n_pruned, current_channels, round_to)


def build_pruner(model, example, cfg: PruneConfig, plan: _Plan, ratio: float, ratios=None):
    """A torch-pruning pruner for ``model``; ``ratios`` maps modules to their own ratio."""
    num_heads, proj_groups = attention.head_groups(plan.attention)
    if cfg.global_pruning and not ratios:
        ratios = attention.pinned_ratios(plan.attention, ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _RoundingPruner(
            model.eval(),
            example,
            importance=make_importance(cfg.importance),
            global_pruning=cfg.global_pruning,
            pruning_ratio=ratio,
            pruning_ratio_dict=ratios or None,
            iterative_steps=cfg.steps,
            round_to=cfg.round_to,
            ignored_layers=list(plan.ignored),
            # nn.MultiheadAttention: its embedding in whole-head units so every head keeps
            # the same width; as channel groups, not num_heads, which would skip that group.
            # User-written attention: q/k/v as num_heads (each head loses the same dims) and
            # the output projection in per-head groups, so heads x head_dim == embedding.
            out_channel_groups={**plan.num_heads, **proj_groups},
            num_heads=num_heads,
        )


def prune_step(pruner, model: nn.Module, plan: _Plan | None = None) -> int:
    """Apply one pruning step; refuse (before any damage is saved) to empty a layer."""
    with warnings.catch_warnings():  # torch-pruning's shape-inference chatter
        warnings.simplefilter("ignore")
        removed = _prune_groups(pruner)
    if plan is not None:
        attention.sync_heads(plan.attention, pruner.num_heads)
    return removed


def _prune_groups(pruner) -> int:
    _refuse_empty_layers(pruner.DG)
    removed = 0
    for group in pruner.step(interactive=True):
        removed += len(group[0][1])
        group.prune()
    return removed


def _refuse_empty_layers(dg) -> None:
    """torch-pruning silently skips a group that would lose every channel, leaving that
    layer unpruned; we make it an error the user can act on (and the MACs search sees)."""
    original = dg.check_pruning_group

    def check(group) -> bool:
        if original(group):
            return True
        dep, idxs = group[0]
        layer = dep.target.module
        name = dg._module2name.get(layer, type(layer).__name__)
        raise TorchslimError(
            f"this would remove all {len(idxs)} channels of layer {name!r}; use a smaller "
            f"--ratio/--target-macs, --local instead of --global, or --ignore {name}"
        )

    if getattr(original, "__name__", "") != "check":
        dg.check_pruning_group = check


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, images: int = 512, batch_size: int = 128) -> bool:
    """Re-estimate BatchNorm running statistics on training images after pruning.

    Removing channels shifts every later layer's input distribution, so the stored BN
    statistics go stale and accuracy collapses before any fine-tuning; a few hundred
    forward passes (no gradients) restore much of it. Returns whether any BN was found.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or data is None:
        return False
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all calibration batches
    xs = data.head(images)
    model.train()
    try:
        for i in range(0, len(xs[0]), batch_size):
            model(*(x[i:i + batch_size] for x in xs))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    return True


def taylor_gradients(model: nn.Module, data, batches: int = 4, batch_size: int = 64) -> None:
    """Fill .grad with the loss gradient on a few training batches (Taylor importance)."""
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=False)
    model.eval().zero_grad(set_to_none=True)
    for i, (*xs, y) in enumerate(loader):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(*xs), y).backward()


def prune_copy(model, example, cfg, plan: _Plan, ratio, ratios_by_name=None):
    """Prune a deep copy in one step (searches, sensitivity); the original is untouched.

    Model and plan are copied together so the plan's modules are the copy's modules.
    """
    m, plan = copy.deepcopy((model, plan))
    ratios = _modules_for(m, ratios_by_name)
    pruner = build_pruner(m, example, dataclasses.replace(cfg, steps=1), plan, ratio, ratios)
    prune_step(pruner, m, plan)
    attention.check_forward(m, example, plan.out_shape)
    return m


def _modules_for(model: nn.Module, ratios_by_name) -> dict[nn.Module, float]:
    if not ratios_by_name:
        return {}
    layers = resolve_layers(model, list(ratios_by_name))
    return {m: float(r) for m, r in zip(layers, ratios_by_name.values(), strict=True)}


def ratio_for_macs(model, example, cfg: PruneConfig, plan: _Plan, iters: int = 10) -> float:
    """Smallest channel ratio whose pruned copy keeps <= target_macs (+1%) of the MACs.

    Bisection on deep copies: MACs fall monotonically with the ratio, and a ratio that
    would empty a layer counts as too large.
    """
    base = count_macs(model, example)
    lo, hi, best, least = 0.0, 0.99, None, base
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            macs = count_macs(prune_copy(model, example, cfg, plan, mid), example)
        except attention.PruneShapeError:
            raise
        except TorchslimError:
            hi = mid
            continue
        least = min(least, macs)
        if macs <= cfg.target_macs * base * (1 + MACS_TOLERANCE):
            hi, best = mid, mid
        else:
            lo = mid
    if best is None:
        raise TorchslimError(
            f"--target-macs {cfg.target_macs} is out of reach: pruning short of removing a "
            f"whole layer still keeps {least / base:.3f} of the MACs; ask for at least that"
        )
    return best


# --- unstructured ---------------------------------------------------------------------


def _weight_layers(model: nn.Module, skip) -> list[tuple[nn.Module, str]]:
    skip_set = {id(m) for m in skip}
    return [
        (m, "weight")
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and id(m) not in skip_set
    ]


def add_masks(model: nn.Module, cfg: PruneConfig, skip) -> list[tuple[nn.Module, str]]:
    """Zero the smallest weights through torch.nn.utils.prune masks (kept while training)."""
    targets = _weight_layers(model, skip)
    if not targets:
        raise TorchslimError("no Conv/Linear layers left to prune; check --ignore")
    if cfg.importance == "random":
        for m, name in targets:
            torch_prune.random_unstructured(m, name, amount=cfg.ratio)
    elif cfg.global_pruning:
        torch_prune.global_unstructured(
            targets, pruning_method=torch_prune.L1Unstructured, amount=cfg.ratio
        )
    else:
        for m, name in targets:
            torch_prune.l1_unstructured(m, name, amount=cfg.ratio)
    return targets


def remove_masks(targets) -> None:
    """Fold the masks into the weights: the file is a plain dense module holding zeros."""
    for m, name in targets:
        torch_prune.remove(m, name)


# --- the public entry point -----------------------------------------------------------


def _numbers(model, example, data) -> dict[str, Any]:
    from .train import evaluate

    out: dict[str, Any] = {
        "params": count_params(model),
        "nonzero_params": count_nonzero(model),
        "macs": count_macs(model, example),
    }
    if data is not None:
        out["accuracy"] = evaluate(model, data.val)[0]
    return out


def prune_model(
    model: nn.Module,
    cfg: PruneConfig,
    example: torch.Tensor | None = None,
    *,
    data=None,
    train_cfg=None,
    distill: bool = False,
    callbacks=None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune a copy of ``model`` (the input is left untouched), fine-tune it on ``data``
    when ``train_cfg`` has epochs (``distill``: the unpruned model is the teacher), and
    measure before/after. ``example`` (a tensor, or a tuple of the model's inputs, batch 1)
    defaults to generated inputs shaped like the data's.
    Returns (pruned model, report)."""
    if cfg.importance == "taylor" and data is None:
        raise TorchslimError(
            "--importance taylor needs gradients: add --data SPEC, or use --importance l2"
        )
    if example is None:
        if data is None:
            raise TorchslimError("pass an example input or data, so the graph can be traced")
        example = data.inputs.with_vocab(model).example(1)
    example = as_tuple(example)
    with torch.random.fork_rng():  # seeded random importance, caller's RNG untouched
        torch.manual_seed(cfg.seed)
        return _prune_model(model, cfg, example, data, train_cfg, distill, callbacks,
                            on_stage or (lambda _msg: None))


def _prune_model(model, cfg, example, data, train_cfg, distill, callbacks, say):
    teacher = copy.deepcopy(model).eval() if distill else None
    model = copy.deepcopy(model).eval()
    ref_out = _output_shape(model, example)
    before = _numbers(model, example, data)
    if cfg.unstructured:
        report = _run_unstructured(model, cfg, example, data, train_cfg, callbacks, say)
    else:
        report = _run_structured(model, cfg, example, data, train_cfg, teacher, callbacks, say)
    model = report.pop("model")
    if _output_shape(model, example) != ref_out:
        raise TorchslimError("pruning changed the model's output shape; --ignore the head layer")
    after = _numbers(model, example, data)
    if cfg.unstructured:
        before["compressed_bytes"] = report.pop("gzip_before")
        after["compressed_bytes"] = gzip_bytes(model)
    return model.eval(), PruneReport(before=before, after=after, **report)


def _output_shape(model, example):
    with torch.no_grad():
        return tuple(call(model.eval(), example).shape)


def _finetune(model, data, train_cfg, teacher, callbacks, say, label):
    if data is None or train_cfg is None or train_cfg.epochs == 0:
        return None
    from .train import fit

    say(label)
    return fit(model, data, train_cfg, teacher=teacher, callbacks=callbacks)


def _run_structured(model, cfg, example, data, train_cfg, teacher, callbacks, say) -> dict:
    plan = make_plan(model, example, cfg.ignore, cfg)
    ratio = cfg.ratio
    if cfg.target_macs is not None:
        say(f"searching the channel ratio that keeps {cfg.target_macs:.0%} of the MACs")
        ratio = ratio_for_macs(model, example, cfg, plan)
    ratios = _modules_for(model, cfg.layer_ratios)
    pruner = build_pruner(model, example, cfg, plan, ratio or 0.0, ratios)
    pruned_top1, fit_result = None, None
    removed = 0
    for step in range(1, cfg.steps + 1):
        if cfg.importance == "taylor":
            taylor_gradients(model, data)
        say(f"pruning step {step}/{cfg.steps}")
        removed += prune_step(pruner, model, plan)
        attention.check_forward(model, example, plan.out_shape)  # before any fine-tuning
        model.zero_grad(set_to_none=True)
        recalibrate_bn(model, data)
        if step == 1 and data is not None and cfg.steps == 1:
            from .train import evaluate

            pruned_top1 = evaluate(model, data.val)[0]
        fit_result = _finetune(model, data, train_cfg, teacher, callbacks, say,
                               f"fine-tuning after step {step}/{cfg.steps}") or fit_result
    if removed == 0:
        plan.notes.append("nothing was pruned: no layer is both prunable and not ignored, "
                          "or the ratio is too small to remove one channel")
    return {"model": model, "ratio": ratio, "notes": plan.notes,
            "pruned_top1": pruned_top1, "fit": fit_result}


def _run_unstructured(model, cfg, example, data, train_cfg, callbacks, say) -> dict:
    gz = gzip_bytes(model)
    skip = resolve_layers(model, cfg.ignore)
    clf = find_classifier(model, example)
    skip = [*skip, clf] if clf is not None else skip
    say(f"zeroing {cfg.ratio:.0%} of the Conv/Linear weights")
    targets = add_masks(model, cfg, skip)
    pruned_top1 = None
    if data is not None:
        from .train import evaluate

        pruned_top1 = evaluate(model, data.val)[0]
    # Masks stay on while fine-tuning so the zeroed weights stay zero.
    fit_result = _finetune(model, data, train_cfg, None, callbacks, say, "fine-tuning")
    remove_masks(targets)
    notes = ["unstructured: zeros do not shrink the dense fp32 file or speed up dense "
             "kernels; see nonzero_params and compressed_bytes (gzip)"]
    return {"model": model, "ratio": cfg.ratio, "notes": notes, "pruned_top1": pruned_top1,
            "fit": fit_result, "gzip_before": gz}
