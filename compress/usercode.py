"""The user's own code behind a pickled model: where it is imported from, and what it needs.

A ``torch.save(model)`` pickle names the classes it was built from (``mynet.FaultNet``); to
load it, Python imports those modules. ``python -c "torch.load(...)"`` finds them because
the current directory is on its path; the ``torchslim`` console script's path does not hold
it. With ``--trust`` torchslim therefore looks where ``python`` would (the current
directory) and beside the model file, plus every ``--code-path DIR``; it never does so
without ``--trust``, since importing a module runs its code.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from .errors import TorchslimError

CODE_HINT = ("run torchslim from the folder that holds that module, or pass --code-path DIR "
             "(the folder to import it from)")
MAIN_HINT = (
    "it was defined in the script that saved the model (__main__), so it exists only while "
    "that script runs: move the class into a module (e.g. mynet.py), import it from there "
    "and save again, or save model.state_dict() and load it with --arch mynet:ClassName "
    "--trust"
)


def add_import_paths(model_path: Path | None, code_paths: Iterable[Path] = ()) -> list[str]:
    """Put the current directory, the model's folder and ``code_paths`` on ``sys.path``
    (first, in that order of precedence after any --code-path); returns what was searched."""
    dirs = [Path(p) for p in code_paths]
    for d in dirs:
        if not d.is_dir():
            raise TorchslimError(f"--code-path {d} is not a folder; pass the folder that "
                                 "holds your model's Python modules")
    dirs += [Path.cwd()] + ([model_path.resolve().parent] if model_path is not None else [])
    searched = []
    for d in reversed(dirs):
        entry = str(d.resolve())
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    for d in dirs:
        if str(d.resolve()) not in searched:
            searched.append(str(d.resolve()))
    return searched


def pickle_globals(path: Path) -> list[str]:
    """``module.name`` of every global a torch.save file's pickle references, read from its
    opcodes without executing anything (empty when the file cannot be read this way)."""
    from .safeload import pickle_globals as scan

    try:
        return [n for n in scan(path) if not n.startswith("<")]
    except (TorchslimError, OSError, ValueError, EOFError, zipfile.BadZipFile):
        return []


def user_classes(names: Iterable[str]) -> list[str]:
    """The globals that are not torch's, torchslim's or the standard library's."""
    stdlib = set(getattr(sys, "stdlib_module_names", ())) | {"builtins", "__builtin__"}
    out = []
    for n in names:
        root = n.split(".", 1)[0]
        if root not in ("torch", "torchslim", "collections", "numpy") and root not in stdlib:
            out.append(n)
    return out


def explain_unpickle_error(exc: BaseException, path: Path, searched: list[str]) -> str:
    """One line that names the missing module/class and says how to make it importable."""
    needed = user_classes(pickle_globals(path))
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        classes = [n for n in needed if n.split(".")[0] == exc.name.split(".")[0]]
        what = ", ".join(classes) or f"module {exc.name}"
        return (f"{path} needs {what}, but module {exc.name!r} is not importable (searched "
                f"{', '.join(searched)} and the installed packages); {CODE_HINT}")
    text = str(exc)
    main = [n for n in needed if n.startswith("__main__.")]
    if main or "on <module '__main__'" in text:
        names = ", ".join(n.removeprefix("__main__.") for n in main) or "its class"
        return f"{path} cannot load {names}: {MAIN_HINT}"
    if isinstance(exc, AttributeError | ImportError):
        return (f"{path} needs {', '.join(needed) or 'a class'} that its module no longer "
                f"defines ({_first_line(exc)}); use the code the model was saved with, or "
                f"{CODE_HINT}")
    return f"could not unpickle {path}: {_first_line(exc)}"


def class_names(model: nn.Module, allowed: set[type]) -> list[str]:
    """``module.Class`` of every module class in ``model`` outside ``allowed``."""
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()
                   if type(m) not in allowed})


def check_importable(names: Iterable[str]) -> None:
    """A class from ``__main__`` (a script) cannot be reloaded from a file: say so early."""
    main = [n for n in names if n.startswith("__main__.")]
    if main:
        raise TorchslimError(
            f"the model holds {', '.join(main)}, defined in a script's __main__; "
            f"a saved copy could not be loaded again: {MAIN_HINT}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def env_code_paths() -> list[Path]:
    """TORCHSLIM_CODE_PATH (os.pathsep-separated), for scripts that set it once."""
    raw = os.environ.get("TORCHSLIM_CODE_PATH", "")
    return [Path(p) for p in raw.split(os.pathsep) if p]
