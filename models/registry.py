"""Reference-model registry, timm style: ``@register_model`` + ``create_model(name)``.

Every entry function takes keyword-only ``num_classes``, ``in_channels`` and
``input_size`` (H, W) plus its own options, and returns a plain ``nn.Module`` mapping
(B, C, H, W) float32 to logits (B, num_classes). ``arch_spec`` gives the JSON-friendly
dict that rebuilds a model, so a saved file can record which architecture it holds.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..compress.errors import TorchslimError, UsageError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    family: str  # the defining module's short name: "pd", "resnet", ...
    description: str  # first line of the entry function's docstring
    default_size: tuple[int, int]  # (H, W) used when input_size is None
    min_size: tuple[int, int]  # smallest (H, W) the architecture can take


_MODELS: dict[str, ModelEntry] = {}
# Short names the docs and issues use for the seed's two models.
ALIASES = {"pd": "pd_model", "pdlight": "pd_light"}
_FIXED = ("num_classes", "in_channels", "input_size")


def register_model(
    *, default_size: tuple[int, int] = (32, 32), min_size: tuple[int, int] = (1, 1)
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register an entry function under its own name."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelEntry(
            name=name,
            fn=fn,
            family=fn.__module__.rsplit(".", 1)[-1],
            description=doc[0] if doc else "",
            default_size=tuple(default_size),
            min_size=tuple(min_size),
        )
        return fn

    return deco


def _entry(name: str) -> ModelEntry:
    name = ALIASES.get(name, name)
    if name in _MODELS:
        return _MODELS[name]
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise TorchslimError(f"unknown model {name!r}{hint}; run `torchslim models` to list them")


def is_registered(name: str) -> bool:
    """A registry name or one of its aliases (``pd``, ``pdlight``)."""
    return ALIASES.get(name, name) in _MODELS


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern (``"resnet*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def model_options(name: str) -> dict[str, Any]:
    """The entry's own options (beyond the three common ones) with their defaults."""
    params = inspect.signature(_entry(name).fn).parameters
    return {k: p.default for k, p in params.items() if k not in _FIXED}


def model_info(name: str) -> dict[str, Any]:
    """One model's family, one-line description, default input and options."""
    e = _entry(name)
    return {
        "name": e.name,
        "family": e.family,
        "description": e.description,
        "input_size": e.default_size,
        "input_shape": (1, *e.default_size),
        "min_size": e.min_size,
        "options": model_options(name),
    }


def _check_size(e: ModelEntry, input_size: Sequence[int] | None) -> tuple[int, int]:
    if input_size is None:
        return e.default_size
    size = tuple(int(s) for s in input_size)
    if len(size) != 2 or min(size) < 1:
        raise UsageError(f"input size must be two positive integers (H, W), got {input_size!r}")
    if size[0] < e.min_size[0] or size[1] < e.min_size[1]:
        lo = "x".join(map(str, e.min_size))
        raise TorchslimError(
            f"model {e.name!r} needs inputs of at least {lo}, got {size[0]}x{size[1]}; "
            "pick a larger input size or another model"
        )
    return size


def _check_options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        valid = ", ".join(options) or "none"
        raise UsageError(
            f"model {name!r} has no option {', '.join(unknown)}; valid options: {valid}"
        )
    return options


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model; ``input_size`` (H, W) defaults to the model's own."""
    e = _entry(name)
    size = _check_size(e, input_size)
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{label} must be a positive integer, got {value!r}")
    _check_options(name, kwargs)
    return e.fn(num_classes=num_classes, in_channels=in_channels, input_size=size, **kwargs)


def arch_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """JSON-friendly ``{"name", "kwargs"}``; ``create_model(name, **kwargs)`` rebuilds it.

    Defaults are filled in, so the spec still rebuilds the same model if a default changes.
    """
    e = _entry(name)
    full: dict[str, Any] = {"num_classes": 10, "in_channels": 1, "input_size": None}
    extra = {k: v for k, v in kwargs.items() if k not in _FIXED}
    full.update(_check_options(name, extra))
    full.update(kwargs)
    full["input_size"] = list(_check_size(e, full["input_size"]))
    return {
        "name": e.name,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()},
    }
