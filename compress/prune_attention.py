"""Structured pruning of attention models, and of any forward that spells out its shapes.

torch-pruning removes channels from a traced graph; it cannot see the Python that reshapes
them. A timm-style attention computes ``qkv(x).reshape(B, N, 3, self.num_heads,
self.head_dim)`` and ``(attn @ v).transpose(1, 2).reshape(B, N, C)``: it works on a pruned
model only if ``head_dim`` is updated and the heads x head_dim width still equals the
embedding width C. So:

- attention modules (a head-count attribute plus the Linears that read one tensor as q, k,
  v) are found by running the model once; their q/k/v layers go to torch-pruning as
  ``num_heads`` (it prunes every head by the same number of dims), and their output
  projection as ``out_channel_groups`` so the embedding is pruned in the same per-head
  units: heads x head_dim == embedding width, as in the unpruned model;
- after pruning, the attributes the forward reads (``head_dim``, ``all_head_size``...)
  are set from the new widths;
- channels added to the model's input (``x + self.pos`` on a (B, N, F) input) cannot be
  pruned: the input's width is fixed. Their groups are found and left alone;
- a pruned copy is run before any real work. If a forward fails on the new widths (a shape
  written as literals), the layers whose widths it fixes are found from the failing
  operation's inputs, kept whole, and the copy is pruned again until it runs; what cannot
  be fixed that way ends in a refusal naming the module and the layers to --ignore.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import TorchslimError
from .inputs import as_tuple, call, call_hooked

# Attribute names attention code uses for its head count, per-head width and total width
# (timm, Hugging Face, nanoGPT/minGPT, lucidrains). nn.MultiheadAttention is pruned by
# torch-pruning's own pruner and is not listed here.
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "n_head", "heads", "num_attention_heads")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "attn_dim")
MAX_FIX_ROUNDS = 8  # distinct failing module classes the plan will work around


# --- attention modules ------------------------------------------------------------------


@dataclass
class AttentionSite:
    """One user-written attention module and the layers that carry its heads."""

    module: nn.Module
    heads_attr: str
    qkv: tuple[nn.Linear, ...]  # one fused qkv Linear, or separate q, k, v
    proj: nn.Linear | None  # the last Linear run inside the module: back to the embedding

    @property
    def heads(self) -> int:
        return getattr(self.module, self.heads_attr)

    def inner_width(self) -> int:
        """Per-projection width: heads x head_dim."""
        if len(self.qkv) == 1:
            return self.qkv[0].out_features // 3
        return self.qkv[0].out_features


def _head_count(m: nn.Module) -> tuple[str, int] | None:
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(m, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return attr, value
    return None


def _linear_calls(model: nn.Module, example) -> list[tuple[nn.Linear, torch.Tensor]]:
    """Every Linear call of one forward pass, in order, with its input tensor."""
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0])))
             for m in model.modules() if isinstance(m, nn.Linear)]
    call_hooked(model, example, hooks)
    return calls


def find_attention(model: nn.Module, example) -> list[AttentionSite]:
    """Attention modules written by users: a head-count attribute, and Linears inside that
    all read the tensor the module's first Linear reads (q, k, v, or one fused qkv)."""
    candidates = [(m, hc) for m in model.modules()
                  if not isinstance(m, nn.MultiheadAttention) and (hc := _head_count(m))]
    if not candidates:
        return []
    calls = _linear_calls(model, example)
    sites = []
    for m, (attr, heads) in candidates:
        inside = {id(s) for s in m.modules()}
        mine = [(lin, x) for lin, x in calls if id(lin) in inside]
        if not mine:
            continue
        qkv = tuple(dict.fromkeys(lin for lin, x in mine if x is mine[0][1]))
        if _head_layout_ok(qkv, heads):
            proj = mine[-1][0] if mine[-1][0] not in qkv else None
            sites.append(AttentionSite(m, attr, qkv, proj))
    return sites


def _head_layout_ok(qkv, heads: int) -> bool:
    widths = {lin.out_features for lin in qkv}
    if len(widths) != 1:  # grouped-query attention (fewer k/v heads): not handled here
        return False
    width = widths.pop()
    if len(qkv) == 1:
        return width % (3 * heads) == 0
    return len(qkv) == 3 and width % heads == 0


def head_groups(sites: list[AttentionSite]) -> tuple[dict, dict]:
    """torch-pruning arguments: ``num_heads`` for the q/k/v layers, and per-head channel
    groups for the output projections, whose outputs are the embedding."""
    num_heads = {lin: s.heads for s in sites for lin in s.qkv}
    out_groups = {s.proj: s.heads for s in sites if s.proj is not None}
    return num_heads, out_groups


def pinned_ratios(sites: list[AttentionSite], ratio: float) -> dict[nn.Module, float]:
    """Under --global ranking, attention widths keep the uniform ratio: ranked apart, the
    heads x head_dim width and the embedding width would end up different."""
    layers = [lin for s in sites for lin in (*s.qkv, s.proj) if lin is not None]
    return dict.fromkeys(layers, ratio)


def sync_heads(sites: list[AttentionSite], num_heads: dict) -> None:
    """Set the attributes each forward reads from the pruned widths."""
    for s in sites:
        heads = num_heads.get(s.qkv[0], s.heads)
        width = s.inner_width()
        setattr(s.module, s.heads_attr, heads)
        for attr in HEAD_DIM_ATTRS:
            if isinstance(getattr(s.module, attr, None), int):
                setattr(s.module, attr, width // heads)
        for attr in WIDTH_ATTRS:
            if isinstance(getattr(s.module, attr, None), int):
                setattr(s.module, attr, width)


# --- channels tied to the model's input -------------------------------------------------


def _input_params(example) -> list[tuple[nn.Parameter, int]]:
    """Float inputs as leaf parameters, so the dependency graph gets a node for each; the
    channel dim is 1 for images (B, C, H, W) and the last one for (B, N, F) sequences."""
    out = []
    for x in as_tuple(example):
        if torch.is_tensor(x) and x.is_floating_point() and x.dim() >= 2:
            dim = 1 if x.dim() >= 4 else x.dim() - 1
            out.append((nn.Parameter(x.detach().clone()), dim))
    return out


def coupled_roots(model: nn.Module, example, ignored, to=()) -> list[str]:
    """Layers whose output channels are coupled (added, multiplied, concatenated) to the
    channels of the model's float inputs, or of the parameters ``to`` when given: pruning
    them would change a width the caller, or a forward, fixes."""
    params = _input_params(example)
    if not params and not to:
        return []
    skip, targets = {id(x) for x in ignored}, {id(p) for p in to} or {id(p) for p, _ in params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(  # (it appends the model's own to the list)
            model.eval(), example_inputs=tuple(p for p, _ in params),
            forward_fn=lambda m, xs: m(*xs), unwrapped_parameters=list(params),
            ignored_params=[x for x in ignored if isinstance(x, nn.Parameter)], verbose=False)
        tied = []
        for m in list(dg.module2node):
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or id(m) in skip:
                continue
            try:
                group = dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels,
                                             [0])
            except Exception:  # untraceable groups are _untraceable_roots' business
                continue
            if any(id(dep.target.module) in targets for dep, _ in group):
                tied.append(m)
    order = {m: i for i, m in enumerate(model.modules())}
    return [dg._module2name[m] for m in sorted(tied, key=order.__getitem__)]


# --- does the pruned forward still run? -------------------------------------------------


class PruneShapeError(TorchslimError):
    """A pruned model's forward fails (or changes its output shape) on the new widths."""

    def __init__(self, message: str, module: str, cls: str, layers: list[str],
                 params: list[str], cause: str):
        super().__init__(message)
        self.module, self.cls, self.cause = module, cls, cause
        self.layers, self.params = layers, params  # what the failing call's inputs came from


class _FailedCall(TorchFunctionMode):
    """Remembers the arguments of the first torch call that raises."""

    def __init__(self):
        super().__init__()
        self.args: tuple | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except Exception:
            if self.args is None:
                self.args = (*args, *(kwargs or {}).values())
            raise


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def _producers(tensors, made_by: dict, params: dict) -> tuple[list[str], list[str]]:
    """The nearest layers whose outputs flow into ``tensors``, and the model parameters
    that flow in without passing a layer (by name)."""
    layers, found = [], [params[id(t)] for t in tensors if id(t) in params]
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen = set()
    while stack and len(seen) < 100_000:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in made_by:
            layers.append(made_by[fn])
        elif id(getattr(fn, "variable", None)) in params:  # a leaf: AccumulateGrad
            found.append(params[id(fn.variable)])
        else:
            stack.extend(f for f, _ in fn.next_functions)
    return sorted(set(layers)), sorted(set(found))


def _locate(model: nn.Module, example) -> tuple[str, str, list[str], list[str]]:
    """Run the forward again to find the innermost module that fails, and what it trips
    on: the nearest layers (and bare parameters) whose outputs reach the failing torch
    call, else (a Python-level check) the last layer that ran; for a forward that runs but
    changes the output shape, the layers feeding the output."""
    names = {m: n for n, m in model.named_modules()}
    active: list[nn.Module] = []
    made_by: dict = {}
    layer_types = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)

    def record(mod, _args, output):
        active.pop()
        output = output[0] if isinstance(output, tuple) else output
        if isinstance(mod, layer_types) and torch.is_tensor(output) and output.grad_fn:
            made_by[output.grad_fn] = names[mod]

    hooks = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda mod, _args: active.append(mod)),
        m.register_forward_hook(record))]
    mode, result = _FailedCall(), None
    try:
        with torch.enable_grad(), mode:
            result = call(model.eval(), example)
    except Exception:  # the failure being located
        pass
    finally:
        for h in hooks:
            h.remove()
    where = active[-1] if active else model
    failed_call = mode.args if mode.args is not None else [result]
    params = {id(p): n for n, p in model.named_parameters()}
    layers, bare = _producers(_tensors(failed_call), made_by, params)
    if not layers and not bare and result is None and made_by:
        layers = [list(made_by.values())[-1]]
    return names[where], type(where).__name__, layers, bare


def check_forward(model: nn.Module, example, out_shape: tuple | None) -> None:
    """Raise PruneShapeError unless the (pruned) model runs and keeps ``out_shape``."""
    try:
        with torch.no_grad():
            out = call(model.eval(), example)
    except Exception as exc:  # whatever the user's forward raises on the new widths
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise _shape_error(model, example, cause) from exc
    if out_shape is not None and (not torch.is_tensor(out) or tuple(out.shape) != out_shape):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise _shape_error(model, example, f"output shape {got} instead of {out_shape}")


def _where(name: str, cls: str) -> str:
    return f"{name!r} ({cls})" if name else f"the model's forward ({cls})"


def _shape_error(model, example, cause: str) -> PruneShapeError:
    name, cls, layers, params = _locate(model, example)
    fix = (f"keep that width: --ignore {','.join(layers)}" if layers else
           f"keep the width of {', '.join(params)}: --ignore a layer whose channels it "
           "follows" if params else "--ignore the layers whose widths it uses")
    msg = (f"pruning breaks {_where(name, cls)}: {cause}; its forward fixes a width that "
           f"pruning changed; {fix}")
    return PruneShapeError(msg, name, cls, layers, params, cause)


# --- the plan: prune a copy, keep whole what a forward fixes ------------------------------


def keep_forward_working(model: nn.Module, example, ignored: list, notes: list[str],
                         trial: Callable[[list], None]) -> None:
    """Prune copies with ``trial(ignored)`` until one runs, each round keeping whole the
    layers whose widths a failing forward fixes (in every module of that class). Extends
    ``ignored`` and ``notes``; refuses when a round finds nothing new to keep."""
    named = dict(model.named_modules())
    for _ in range(MAX_FIX_ROUNDS):
        try:
            trial(ignored)
            return
        except PruneShapeError as err:
            kept = {id(x) for x in ignored}
            culprits = _in_same_modules(model, err) or _following(model, example, ignored, err)
            new = [n for n in culprits if id(named[n]) not in kept]
            if not new:
                raise _refusal(err, culprits) from None
            ignored.extend(named[n] for n in new)
            notes.append(_kept_note(new, err))
        except TorchslimError:  # e.g. a layer would lose every channel: the real run says so
            return
    raise TorchslimError(f"pruning still breaks forwards after keeping {MAX_FIX_ROUNDS} sets "
                         "of layers whole; --ignore the layers of modules with fixed shapes")


def _following(model, example, ignored, err: PruneShapeError) -> list[str]:
    """For a parameter the forward reshapes with literals: one layer whose channels it
    follows (ignoring that layer keeps the whole group, the parameter included)."""
    params = dict(model.named_parameters())
    to = [params[n] for n in err.params if n in params]
    return coupled_roots(model, example, ignored, to)[:1] if to else []


def _kept_note(kept: list[str], err: PruneShapeError) -> str:
    if err.layers:
        return (f"kept {', '.join(kept)} whole: the forward of {err.cls} fails when their "
                f"widths change ({err.cause})")
    return (f"kept {', '.join(kept)} whole, and with it the width of {', '.join(err.params)}: "
            f"the forward of {err.cls} fails when that changes ({err.cause})")


def _refusal(err: PruneShapeError, tried: list[str]) -> TorchslimError:
    where = _where(err.module, err.cls)
    if tried:
        return TorchslimError(
            f"cannot prune this model: {where} fails after pruning ({err.cause}) even with "
            f"{', '.join(tried)} kept whole; --ignore the layers whose widths its forward "
            "fixes, or prune with --unstructured")
    return TorchslimError(
        f"cannot prune this model: {where} fails after pruning ({err.cause}) and torchslim "
        "cannot tell which layer's width it fixes; --ignore the layers that feed it, or "
        "prune with --unstructured")


def _in_same_modules(model: nn.Module, err: PruneShapeError) -> list[str]:
    """The culprit layers, and their counterparts in every other module of the failing
    module's class (the same code hard-codes the same shape)."""
    prefix = f"{err.module}." if err.module else ""
    inside = [n[len(prefix):] for n in err.layers if prefix and n.startswith(prefix)]
    if not inside:
        return list(err.layers)
    named = dict(model.named_modules())
    out = list(err.layers)
    for name, m in named.items():
        if type(m).__name__ == err.cls and name:
            out += [f"{name}.{rel}" for rel in inside if f"{name}.{rel}" in named]
    return list(dict.fromkeys(out))
