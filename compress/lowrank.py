"""Low-rank Linear layers: W (out x in) -> B A with A (r x in), B (out x r), by truncated SVD.

The seed's "matrix decomposition" family. Truncated SVD is the best rank-r approximation
(Eckart-Young), and its relative error is sqrt(sum of dropped s^2 / sum of all s^2).
A layer is replaced only when r * (in + out) < in * out, i.e. when it really shrinks.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import register_config
from .errors import TorchslimError, UsageError


@register_config("lowrank")
@dataclass(frozen=True)
class LowRankConfig:
    rank_ratio: float = 0.25  # r = round(ratio * min(in, out)), at least 1
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 < self.rank_ratio < 1.0:
            raise UsageError(f"--rank-ratio must be in (0, 1), got {self.rank_ratio}")


@dataclass
class LowRankLayer:
    name: str
    before: str
    after: str
    params_before: int
    params_after: int
    rel_error: float


@dataclass
class LowRankReport:
    layers: list[LowRankLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rank_for(linear: nn.Linear, ratio: float) -> int:
    return max(1, round(ratio * min(linear.in_features, linear.out_features)))


def lowrank_model(model: nn.Module, cfg: LowRankConfig) -> tuple[nn.Module, LowRankReport]:
    """A copy of ``model`` with each shrinkable nn.Linear factorised; the input is untouched."""
    model = copy.deepcopy(model)
    report = LowRankReport()
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in cfg.skip)
    ]
    if not targets:
        raise TorchslimError(
            "no nn.Linear layer to factorise outside --skip; drop --linear low-rank"
        )
    for name, lin in targets:
        r = rank_for(lin, cfg.rank_ratio)
        if r * (lin.in_features + lin.out_features) >= lin.in_features * lin.out_features:
            report.notes.append(
                f"{name}: kept, rank {r} would not reduce its "
                f"{lin.in_features}x{lin.out_features} weight"
            )
            continue
        new, err = factorise_linear(lin, r)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.layers.append(
            LowRankLayer(
                name,
                f"Linear({lin.in_features}->{lin.out_features})",
                f"Linear({lin.in_features}->{r}) > Linear({r}->{lin.out_features})",
                sum(p.numel() for p in lin.parameters()),
                sum(p.numel() for p in new.parameters()),
                err,
            )
        )
    return model, report


@torch.no_grad()
def factorise_linear(lin: nn.Linear, rank: int) -> tuple[nn.Sequential, float]:
    """Sequential(Linear(in, r, bias=False), Linear(r, out)) from the rank-r SVD of W."""
    w = lin.weight.detach().float()  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()  # split each singular value evenly between the two factors
    kw = dict(device=lin.weight.device, dtype=lin.weight.dtype)
    first = nn.Linear(lin.in_features, rank, bias=False, **kw)
    second = nn.Linear(rank, lin.out_features, bias=lin.bias is not None, **kw)
    first.weight.copy_(root[:, None] * vh[:rank])
    second.weight.copy_(u[:, :rank] * root[None, :])
    if lin.bias is not None:
        second.bias.copy_(lin.bias)
    err = (s[rank:].square().sum() / s.square().sum().clamp_min(1e-24)).sqrt().item()
    return nn.Sequential(OrderedDict(down=first, up=second)), err
