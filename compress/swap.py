"""Architecture swap: standard convs -> depthwise-separable (SVD-initialised), cheap activations.

A KxK conv with weight W (C_out, C_in, K, K) computes, for each input channel i, the
(C_out x K^2) slice W[:, i] applied to x_i. A depthwise-separable pair (one KxK filter d_i per
input channel, then a 1x1 mix P) computes P[:, i] d_i^T instead: a rank-1 slice. The best
rank-1 slice in the Frobenius sense is the SVD's leading term s u v^T, so setting
d_i = sqrt(s) v and P[:, i] = sqrt(s) u makes the swapped model start as close to the
original as the structure allows (Eckart-Young), before any training.

Only torch.nn classes are used in the swapped model, so torchslim's allow-listed loader
reloads it without --trust.
"""

from __future__ import annotations

import ast
import copy
import difflib
import inspect
import textwrap
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import register_config
from .errors import TorchslimError, UsageError
from .inputs import as_tuple, call
from .lowrank import LowRankConfig, lowrank_model

CONV_MODES = ("depthwise-separable", "none")
MID_MODES = ("none", "bn-act")
ACT_MODES = ("none", "hard", "relu6")
GELU_MODES = ("tanh", "hardswish")
INIT_MODES = ("svd", "random")
LINEAR_MODES = ("none", "low-rank")
# A calibrated mid BN shifts each channel so values down to mean - 3 std pass the ReLU
# unchanged: the mid then starts as identity for all but the far tail.
MID_SHIFT_STD = 3.0


@register_config("swap")
@dataclass(frozen=True)
class SwapConfig:
    conv: str = "depthwise-separable"
    mid: str = "none"  # "bn-act": BatchNorm + ReLU between depthwise and pointwise (MobileNetV1)
    # The stem (1 or 3 input channels) stays standard: a rank-1 slice per input channel keeps
    # little of it, and it is cheap anyway.
    min_channels: int = 4
    skip: tuple[str, ...] = ()  # module names (and everything under them) left untouched
    init: str = "svd"  # "random" exists to measure what the SVD init is worth
    act: str = "none"
    gelu: str = "tanh"  # GELU under --act hard: tanh-approximate GELU (closest) or Hardswish
    linear: str = "none"
    rank_ratio: float = 0.25
    # Alternating least-squares rounds (pointwise, then depthwise) when calibration images
    # are given; each round lowers the layer's output error, with diminishing returns.
    refit_rounds: int = 2

    def __post_init__(self):
        for name, value, allowed in (
            ("conv", self.conv, CONV_MODES),
            ("mid", self.mid, MID_MODES),
            ("init", self.init, INIT_MODES),
            ("act", self.act, ACT_MODES),
            ("gelu", self.gelu, GELU_MODES),
            ("linear", self.linear, LINEAR_MODES),
        ):
            if value not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.refit_rounds < 0:
            raise UsageError(f"--refit-rounds must be >= 0, got {self.refit_rounds}")
        if self.min_channels < 1:
            raise UsageError(f"--min-channels must be >= 1, got {self.min_channels}")
        if self.conv == "none" and self.act == "none" and self.linear == "none":
            raise UsageError("nothing to swap: give --conv, --act or --linear")
        LowRankConfig(rank_ratio=self.rank_ratio)  # validates the ratio


@dataclass
class LayerSwap:
    """One replaced module: what it was, what it became, and how far the init is from it."""

    name: str
    kind: str  # "conv" | "linear" | "act"
    before: str
    after: str
    params_before: int
    params_after: int
    rel_error: float | None = None  # ||W - W_new|| / ||W|| (None for activations)
    out_error: float | None = None  # ||y - y_new|| / ||y|| on the calibration images


@dataclass
class SwapReport:
    layers: list[LayerSwap] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)  # calls in forward() left unswapped
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "layers": [vars(layer) for layer in self.layers],
            "functional": list(self.functional),
            "notes": list(self.notes),
        }


def swap_model(
    model: nn.Module, cfg: SwapConfig, example_inputs: torch.Tensor | None = None
) -> tuple[nn.Module, SwapReport]:
    """Return a swapped copy of ``model`` (the input is not modified) and what was done.

    ``example_inputs`` (a batch of real images) makes the init data-aware: each swapped layer
    is refitted by least squares to reproduce the original layer's output on them, and the
    mid BatchNorm of ``mid="bn-act"`` is calibrated to start as identity. Without it the init
    is the weights-only SVD and the report says so.
    """
    check_skip_names(model, cfg.skip)
    model = copy.deepcopy(model)
    report = SwapReport()
    if cfg.conv == "depthwise-separable":
        _swap_convs(model, cfg, example_inputs, report)
    if cfg.act != "none":
        _swap_acts(model, cfg, report)
    if cfg.linear == "low-rank":
        model, low = lowrank_model(model, LowRankConfig(rank_ratio=cfg.rank_ratio, skip=cfg.skip))
        report.layers += [LayerSwap(kind="linear", **vars(r)) for r in low.layers]
        report.notes += low.notes
    return model, report


def check_skip_names(model: nn.Module, skip) -> None:
    names = [name for name, _ in model.named_modules() if name]
    unknown = [s for s in skip if s not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TorchslimError(
            f"--skip {', '.join(unknown)}: no such module in the model{hint}; use the dotted "
            "names model.named_modules() gives, e.g. features.3"
        )


def is_skipped(name: str, skip) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- convolutions -----------------------------------------------------------------------


def swappable_convs(model: nn.Module, cfg: SwapConfig) -> list[tuple[str, nn.Conv2d]]:
    """Standard (groups=1) Conv2d with a kernel larger than 1x1 and enough input channels."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d  # subclasses (e.g. QAT convs) carry semantics we would lose
        and m.groups == 1
        and max(m.kernel_size) > 1
        and m.in_channels >= cfg.min_channels
        and not is_skipped(name, cfg.skip)
    ]


def _why_not(model: nn.Module, cfg: SwapConfig) -> str:
    """Why each Conv2d was passed over, counted: grouped, 1x1, too few inputs, skipped."""
    reasons: dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        why = ("grouped or depthwise" if m.groups != 1 else
               "1x1" if max(m.kernel_size) == 1 else
               f"< {cfg.min_channels} inputs" if m.in_channels < cfg.min_channels else
               "skipped")
        reasons[why] = reasons.get(why, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in reasons.items())


def _swap_convs(model, cfg, example_inputs, report) -> None:
    convs = swappable_convs(model, cfg)
    if not convs:
        total = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        if not total:
            raise TorchslimError(
                "no convolution to swap: the model has no Conv2d; use --conv none with "
                "--act or --linear low-rank for activation/linear swaps"
            )
        raise TorchslimError(
            f"no convolution to swap: the model has {total} Conv2d but none is a standard "
            f"KxK conv with >= {cfg.min_channels} input channels outside --skip "
            f"({_why_not(model, cfg)}); lower --min-channels, or use --conv none for "
            "activation/linear swaps only"
        )
    original = copy.deepcopy(model).eval() if example_inputs is not None else None
    for name, conv in convs:
        new, err = separable_from_conv(conv, mid=cfg.mid, init=cfg.init)
        out_err = None
        if original is not None and cfg.init == "svd":
            # Layer by layer, in forward order: the swapped layer sees the partly swapped
            # model's input and is fitted to the original's output, so errors do not pile up.
            x_new = _module_input(model, conv, example_inputs)
            x_old = _module_input(original, original.get_submodule(name), example_inputs)
            with torch.no_grad():
                target = conv(x_old)
            out_err = refit_separable(new, x_new, target, rounds=cfg.refit_rounds)
        _replace(model, name, new)
        report.layers.append(
            LayerSwap(name, "conv", _describe(conv), _describe(new), n_params(conv),
                      n_params(new), err, out_err)
        )
    _note_calibration(cfg, example_inputs, report)


def _note_calibration(cfg, example_inputs, report) -> None:
    if cfg.init == "random":
        report.notes.append("random init: the swapped layers start unrelated to the original")
    elif example_inputs is None:
        report.notes.append(
            "weights-only SVD init (no calibration images): give --data to refit each "
            "layer on real activations, which starts far closer to the original"
        )
    else:
        report.notes.append(
            f"SVD init refitted by least squares on {len(as_tuple(example_inputs)[0])} "
            "calibration samples "
            f"({cfg.refit_rounds} alternating rounds); out_error is on those images"
        )
        if cfg.mid == "bn-act":
            report.notes.append(
                "mid BN+ReLU calibrated to start as identity except values below channel "
                f"mean - {MID_SHIFT_STD:g} std"
            )
    if cfg.mid == "bn-act" and example_inputs is None:
        report.notes.append(
            "mid BN+ReLU not calibrated (no example input): the swapped model starts "
            "further from the original than with --mid none"
        )


@torch.no_grad()
def _module_input(model: nn.Module, module: nn.Module, inputs) -> torch.Tensor:
    """``module``'s input when ``model`` runs on ``inputs`` (eval mode, one pass)."""
    seen: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was_training = model.training
    try:
        model.eval()
        call(model, inputs)
    finally:
        model.train(was_training)
        hook.remove()
    if not seen:
        raise TorchslimError("a swapped conv is not used in forward(); --skip it")
    return seen[0]


def rank1_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-1 approximation of each input channel's (C_out x K^2) slice.

    Returns depthwise weight (C_in, 1, kh, kw), pointwise weight (C_out, C_in, 1, 1) and the
    relative Frobenius error of the reconstructed full weight.
    """
    c_out, c_in, kh, kw = weight.shape
    w = weight.detach().float()
    slices = w.permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)  # (C_in, C_out, K^2)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    root = s[:, 0].sqrt()  # balanced split of the singular value between the two factors
    dw = (vh[:, 0, :] * root[:, None]).reshape(c_in, 1, kh, kw)
    pw = (u[:, :, 0] * root[:, None]).T.reshape(c_out, c_in, 1, 1)
    approx = pw * dw.reshape(1, c_in, kh, kw)  # (C_out, C_in, kh, kw)
    err = ((w - approx).norm() / w.norm().clamp_min(1e-12)).item()
    return dw.to(weight.dtype), pw.to(weight.dtype), err


def separable_from_conv(
    conv: nn.Conv2d, *, mid: str = "none", init: str = "svd"
) -> tuple[nn.Sequential, float]:
    """Depthwise KxK + [BN + ReLU] + pointwise 1x1 replacing ``conv``, and its weight error."""
    c_in, c_out = conv.in_channels, conv.out_channels
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    depthwise = nn.Conv2d(
        c_in, c_in, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=c_in, bias=False, padding_mode=conv.padding_mode, **kw,
    )
    need_bias = conv.bias is not None or mid == "bn-act"  # the BN shift is undone in this bias
    pointwise = nn.Conv2d(c_in, c_out, 1, bias=need_bias, **kw)
    parts = OrderedDict(depthwise=depthwise)
    if mid == "bn-act":
        parts["bn"] = nn.BatchNorm2d(c_in, **kw)
        parts["act"] = nn.ReLU(inplace=True)
    parts["pointwise"] = pointwise
    seq = nn.Sequential(parts)
    if init == "random":
        return seq, _random_init_error(conv, depthwise, pointwise)
    dw, pw, err = rank1_factors(conv.weight)
    with torch.no_grad():
        depthwise.weight.copy_(dw)
        pointwise.weight.copy_(pw)
        if pointwise.bias is not None:
            pointwise.bias.copy_(conv.bias if conv.bias is not None else 0.0)
    return seq, err


def _random_init_error(conv, depthwise, pointwise) -> float:
    w = conv.weight.detach().float()
    approx = pointwise.weight.detach().float() * depthwise.weight.detach().float().transpose(0, 1)
    return ((w - approx).norm() / w.norm().clamp_min(1e-12)).item()


# --- data-aware refit ---------------------------------------------------------------------

CHUNK = 32  # images per step when accumulating least-squares statistics (bounds memory)
MAX_DW_UNKNOWNS = 4608  # C_in * K^2 above this: the depthwise solve gets slow, refit pw only


@torch.no_grad()
def refit_separable(seq: nn.Sequential, x: torch.Tensor, target: torch.Tensor,
                    rounds: int = 2) -> float:
    """Fit the separable pair to ``target = conv(x)`` by alternating least squares.

    With the depthwise filters fixed, the pointwise 1x1 (and bias) is a linear regression of
    the target on the depthwise outputs; with the pointwise fixed, the depthwise filters are
    a linear regression on im2col patches. Each step can only lower the error on ``x``.
    Returns the relative output error on ``x``.
    """
    dw, pw = seq.depthwise, seq.pointwise
    can_fit_dw = (
        dw.padding_mode == "zeros" and not isinstance(dw.padding, str)
        and dw.in_channels * dw.kernel_size[0] * dw.kernel_size[1] <= MAX_DW_UNKNOWNS
    )
    _fit_pointwise(dw, pw, x, target)
    for _ in range(rounds if can_fit_dw else 0):
        _fit_depthwise(dw, pw, x, target)
        _fit_pointwise(dw, pw, x, target)
    if "bn" in seq._modules:
        _calibrate_mid(seq, x)
    was_training = seq.training
    seq.eval()
    out = torch.cat([seq(xs) for xs in x.split(CHUNK)])
    seq.train(was_training)
    return ((out - target).norm() / target.norm().clamp_min(1e-12)).item()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()  # (B*H*W, C)


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    # A tiny ridge keeps dead channels (all-zero columns) from making the system singular.
    lam = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs)


def _fit_pointwise(dw: nn.Conv2d, pw: nn.Conv2d, x, y) -> None:
    c_in, c_out, has_b = pw.in_channels, pw.out_channels, pw.bias is not None
    k = c_in + int(has_b)
    gram = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(k, c_out, dtype=torch.float64, device=x.device)
    for xs, ys in zip(x.split(CHUNK), y.split(CHUNK), strict=True):
        a = _rows(dw(xs))  # (n, C_in)
        if has_b:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], dim=1)
        gram += a.T @ a
        rhs += a.T @ _rows(ys)
    sol = _ridge_solve(gram, rhs)  # (k, C_out)
    pw.weight.copy_(sol[:c_in].T.reshape(c_out, c_in, 1, 1))
    if has_b:
        pw.bias.copy_(sol[c_in])


def _fit_depthwise(dw: nn.Conv2d, pw: nn.Conv2d, x, y) -> None:
    """y[n, o] = b_o + sum_i P[o, i] <patch_i[n], d_i>: linear in the filters d."""
    c_in, (kh, kw) = dw.in_channels, dw.kernel_size
    k2 = kh * kw
    p = pw.weight.flatten(1).double()  # (C_out, C_in)
    b = pw.bias.double() if pw.bias is not None else 0.0
    gram = torch.zeros(c_in * k2, c_in * k2, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(c_in * k2, dtype=torch.float64, device=x.device)
    for xs, ys in zip(x.split(CHUNK), y.split(CHUNK), strict=True):
        cols = F.unfold(xs, dw.kernel_size, dw.dilation, dw.padding, dw.stride)
        cols = cols.transpose(1, 2).reshape(-1, c_in * k2).double()  # (n, C_in*K^2)
        gram += cols.T @ cols
        resid = (_rows(ys) - b) @ p  # (n, C_in)
        rhs += (cols * resid.repeat_interleave(k2, dim=1)).sum(0)
    ptp = (p.T @ p).repeat_interleave(k2, dim=0).repeat_interleave(k2, dim=1)
    d = _ridge_solve(gram * ptp, rhs[:, None])[:, 0]
    dw.weight.copy_(d.reshape(c_in, 1, kh, kw))


@torch.no_grad()
def _calibrate_mid(seq: nn.Sequential, calib: torch.Tensor) -> None:
    """Make BN + ReLU start as identity on the calibration batch, in eval and train mode.

    BN normalises by the channel's mean/var and its affine undoes that (weight = std, bias =
    mean), then adds a shift so the ReLU sees positive values; the pointwise bias subtracts
    the shifted amount again (P @ shift).
    """
    y = torch.cat([seq.depthwise(xs) for xs in calib.split(CHUNK)]).float()  # (B, C_in, H, W)
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), unbiased=False)
    shift = (MID_SHIFT_STD * var.sqrt() - mean).clamp_min(0.0)
    bn = seq.bn
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_((var + bn.eps).sqrt())
    bn.bias.copy_(mean + shift)
    pw = seq.pointwise
    pw.bias.sub_(pw.weight.flatten(1).float() @ shift)


# --- activations ------------------------------------------------------------------------


def _hard_map(cfg: SwapConfig) -> dict[type, callable]:
    if cfg.act == "relu6":
        return {nn.ReLU: lambda m: nn.ReLU6(inplace=m.inplace)}
    gelu = (
        (lambda m: nn.GELU(approximate="tanh"))
        if cfg.gelu == "tanh"
        else (lambda m: nn.Hardswish())
    )
    return {
        nn.Sigmoid: lambda m: nn.Hardsigmoid(),
        nn.SiLU: lambda m: nn.Hardswish(inplace=m.inplace),
        nn.Tanh: lambda m: nn.Hardtanh(),
        nn.GELU: gelu,
    }


def _swap_acts(model: nn.Module, cfg: SwapConfig, report: SwapReport) -> None:
    mapping = _hard_map(cfg)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) in mapping and not is_skipped(name, cfg.skip)
    ]
    for name, m in targets:
        if isinstance(m, nn.GELU) and m.approximate == "tanh" and cfg.gelu == "tanh":
            continue  # already the cheap form
        new = mapping[type(m)](m)
        _replace(model, name, new)
        report.layers.append(LayerSwap(name, "act", _describe(m), _describe(new), 0, 0))
    if not targets:
        report.notes.append(f"--act {cfg.act}: no activation module to swap")
    report.functional += functional_calls(model, cfg.act)


FUNCTIONAL = {
    "hard": {"sigmoid", "silu", "tanh", "gelu", "swish"},
    "relu6": {"relu", "relu_"},
}


def functional_calls(model: nn.Module, act: str) -> list[str]:
    """Activation calls written inside forward() (F.silu(x), torch.sigmoid(x), x.tanh()):
    module swaps cannot reach them, so the user is told where they are."""
    wanted = FUNCTIONAL.get(act, set())
    found: list[str] = []
    for cls in _user_classes(model):
        try:
            src = textwrap.dedent(inspect.getsource(cls.forward))
            first = inspect.getsourcelines(cls.forward)[1]
        except (OSError, TypeError):
            found.append(f"{cls.__name__}.forward: source not available, not scanned")
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in wanted:
                    call = ast.unparse(node.func)
                    found.append(f"{cls.__name__}.forward line {first + node.lineno - 1}: {call}()")
    return found


def _user_classes(model: nn.Module) -> list[type]:
    """Module classes whose forward the user wrote (torch's own are known and not scanned)."""
    classes = []
    for m in model.modules():
        cls = type(m)
        if cls.__module__.startswith("torch.") or cls in classes:
            continue
        if cls.forward is nn.Module.forward:
            continue
        classes.append(cls)
    return classes


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Sequential):
        return " > ".join(_describe(c) for c in m)
    if isinstance(m, nn.Conv2d):
        k = "x".join(str(v) for v in m.kernel_size)
        g = f", g={m.groups}" if m.groups > 1 else ""
        return f"Conv{k}({m.in_channels}->{m.out_channels}{g})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}->{m.out_features})"
    if isinstance(m, nn.BatchNorm2d):
        return "BN"
    if isinstance(m, nn.GELU):
        return f"GELU({m.approximate})" if m.approximate != "none" else "GELU"
    return type(m).__name__
