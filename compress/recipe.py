"""Recipe files: the pipeline's list of method configs, as TOML, YAML or JSON.

TOML (the default) looks like::

    [[steps]]
    method = "swap"
    conv = "depthwise-separable"

    [[steps]]
    method = "quantize"
    mode = "static"
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from .config import config_from_dict, config_to_dict
from .errors import TorchslimError
from .io import atomic_write

SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def _parse(path: Path) -> Any:
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def load_recipe(path: str | Path) -> list:
    """The configs a recipe file lists, validated like command-line flags."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise TorchslimError(f"recipe {path} must end in {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise TorchslimError(f"recipe file not found: {path}")
    try:
        doc = _parse(path)
    except Exception as exc:  # tomllib, yaml and json each raise their own error types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TorchslimError(f"recipe {path} is not valid {path.suffix[1:]}: {first}") from exc
    steps = doc.get("steps") if isinstance(doc, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise TorchslimError(f"recipe {path} needs a list of tables under 'steps' "
                             "([[steps]] in TOML), each with a 'method'")
    configs = []
    for i, step in enumerate(steps, 1):
        try:
            configs.append(config_from_dict(step))
        except TorchslimError as exc:
            raise type(exc)(f"recipe {path}, step {i}: {exc}") from exc
        except TypeError as exc:
            raise TorchslimError(f"recipe {path}, step {i}: {exc}") from exc
    return configs


def _plain(cfg) -> dict[str, Any]:
    """TOML has no null: drop None fields, which is safe only where None is the default."""
    d = config_to_dict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for key in [k for k, v in d.items() if v is None]:
        if defaults.get(key) is not None:
            raise TorchslimError(f"cannot write {key}=None of {d['method']} to TOML; use .json")
        del d[key]
    return d


def dump_recipe(configs: list, path: str | Path, *, force: bool = False) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TorchslimError(f"--dump-recipe {path} must end in {', '.join(SUFFIXES)}")
    if suffix == ".toml":
        import tomli_w

        text = tomli_w.dumps({"steps": [_plain(c) for c in configs]})
    elif suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump({"steps": [config_to_dict(c) for c in configs]}, sort_keys=False)
    else:
        text = json.dumps({"steps": [config_to_dict(c) for c in configs]}, indent=2)
    return atomic_write(path, lambda tmp: tmp.write_text(text), force=force)
