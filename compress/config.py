"""Method configs: frozen dataclasses, validated on construction, round-tripped to dicts.

Each compression method registers its config class under a method name. A pipeline
(and a recipe file) is a list of ``{"method": name, **fields}`` dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import TorchslimError

C = TypeVar("C")

METHODS: dict[str, type] = {}


def register_config(name: str):
    """Class decorator: make a config reachable by method name (recipes, history)."""

    def deco(cls: type[C]) -> type[C]:
        cls.method = name  # type: ignore[attr-defined]
        METHODS[name] = cls
        return cls

    return deco


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``{"method": name, **fields}`` with tuples turned to lists, JSON/TOML friendly."""
    out: dict[str, Any] = {"method": type(cfg).method}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(d: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; unknown methods and keys are errors, not ignored."""
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise TorchslimError(f"unknown method {name!r} in recipe; known methods: {known}")
    cls = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise TorchslimError(
            f"unknown key(s) {', '.join(unknown)} for method {name!r}; "
            f"valid keys: {', '.join(fields)}"
        )
    for key, value in d.items():
        if isinstance(value, list):
            d[key] = tuple(value)
    return cls(**d)
