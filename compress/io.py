"""Model files: load the kinds users bring, save torchslim's own, write atomically.

torchslim's own ``.pt`` file pickles the whole module (so pruned and swapped shapes survive)
inside ``{"format": "torchslim", "model": ..., "meta": ...}``. When every module class in it
is torch's or torchslim's, it loads with ``weights_only=True`` and an allow-list of module
classes, so no pickled code runs and no ``--trust`` is needed. A model built from the user's
own classes is saved the same way, with ``meta.requires`` naming the classes it needs;
like any other pickle it then loads only with ``--trust``, from where those classes import.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import inspect
import json
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .bounds import check_attributes, check_onnx_loops, require_regular
from .errors import TorchslimError, UsageError
from .filecheck import check_onnx
from .inputs import InputSpec
from .safeload import ALTERED, AlteredFile, NeedsTrust, UnreadableFile, is_zip, load_checked

FORMAT = "torchslim"
TRUST_ENV = "TORCHSLIM_TRUST"
# Outputs finished in this process, oldest first: an interrupted command says what it kept.
WRITTEN: list[Path] = []
TRUST_HINT = (
    "loading a pickle can run arbitrary code; pass --trust (or set TORCHSLIM_TRUST=1) "
    "only if you trust the file's source"
)


@dataclass
class ModelMeta:
    """What torchslim knows about a model beyond its weights."""

    arch: dict[str, Any] | None = None  # {"name": registry name, "kwargs": {...}}
    input_shape: tuple[int, ...] | None = None  # (C, H, W), no batch dimension
    class_names: list[str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    torchslim_version: str = __version__
    # Every input of forward (InputSpec.to_list()); input_shape alone means one float image.
    inputs: list[dict[str, Any]] | None = None
    # "module.Class" of the user's own module classes the pickled model needs to load.
    requires: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return d

    def input_spec(self) -> InputSpec | None:
        spec = InputSpec.from_list(self.inputs)
        if spec is None and self.input_shape:
            spec = InputSpec.image(self.input_shape)
        return spec

    def set_input_spec(self, spec: InputSpec) -> None:
        """Record ``spec``; ``input_shape`` keeps the one-float-input shape older readers use."""
        self.inputs = spec.to_list()
        single = spec.tensors[0] if len(spec.tensors) == 1 else None
        self.input_shape = single.sample_shape if single is not None and single.is_float else None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ModelMeta:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        meta = cls(**{k: v for k, v in d.items() if k in known})
        if meta.input_shape is not None:
            meta.input_shape = tuple(int(v) for v in meta.input_shape)
        return meta


@dataclass
class LoadedModel:
    """A model and where it came from. ``model`` is None for ONNX files (run by onnxruntime)."""

    model: nn.Module | torch.jit.ScriptModule | None
    kind: str  # "torchslim" | "pickle" | "torchscript" | "state_dict" | "onnx" | "exported"
    path: Path | None
    meta: ModelMeta
    file_bytes: int | None

    @property
    def name(self) -> str:
        return self.path.name if self.path else "model"


@dataclass(frozen=True)
class LoadOptions:
    """How to open a model file: what every model-reading command shares, in one object."""

    trust: bool = False
    arch: str | None = None  # architecture of a state_dict: registry name or module:Class
    num_classes: int | None = None
    in_channels: int | None = None
    inputs: InputSpec | None = None  # stated by the user; wins over the file's metadata
    code_paths: tuple[Path, ...] = ()  # where the user's classes import from (with trust)

    def load(self, path: str | Path) -> LoadedModel:
        image = self.inputs.image_shape if self.inputs is not None else None
        loaded = load_model(
            path, trust=self.trust, arch=self.arch, num_classes=self.num_classes,
            in_channels=self.in_channels or (image[0] if image else None),
            input_size=tuple(image[1:]) if image else None, code_paths=self.code_paths)
        if self.inputs is not None:
            loaded.meta.set_input_spec(self.inputs)
        return loaded


_YES, _NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def trust_env() -> bool:
    """TORCHSLIM_TRUST as an explicit yes or no: a value that is neither (``maybe``,
    ``enabled``) is refused rather than guessed, since guessing yes runs a file's code."""
    raw = os.environ.get(TRUST_ENV, "")
    value = raw.strip().lower()
    if value in _YES:
        return True
    if value in _NO:
        return False
    raise UsageError(f"{TRUST_ENV}={raw!r} is neither yes ({', '.join(_YES)}) nor no "
                     f"({', '.join(v for v in _NO if v)} or empty); set one of them or unset it")


def trusted(flag: bool) -> bool:
    return trust_env() or flag  # the variable is checked even when --trust is given


def history_entry(method: str, config: dict, before: dict, after: dict, notes=()) -> dict:
    """One step of a model's compression history, as stored in its file."""
    return {
        "method": method,
        "config": config,
        "before": before,
        "after": after,
        "notes": list(notes),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


# --- allow-list -----------------------------------------------------------------------


def _module_classes(root_modules: Iterable[object]) -> set[type]:
    found: set[type] = set()
    for mod in root_modules:
        for obj in vars(mod).values():
            if inspect.isclass(obj) and issubclass(obj, nn.Module):
                found.add(obj)
    return found


def safe_classes() -> list[type]:
    """Every nn.Module class torch.nn defines, plus every one defined under ``torchslim.``."""
    torch_mods = [m for n, m in list(sys.modules.items()) if n.startswith("torch.nn.modules")]
    ours = [m for n, m in list(sys.modules.items()) if n.startswith("torchslim.") and m]
    classes = _module_classes([nn, *torch_mods])
    classes |= {c for c in _module_classes(ours) if c.__module__.startswith("torchslim.")}
    return sorted(classes, key=lambda c: (c.__module__, c.__qualname__))


def _import_torchslim_models() -> None:
    """Import the model families so their classes are on the allow-list."""
    from .. import models  # noqa: F401  (importing the package imports every family)
    from . import runtime  # noqa: F401  (quantize's weight-only / fp16 / bf16 modules)


# --- loading --------------------------------------------------------------------------


def _check_readable(path: Path) -> int:
    if not path.exists():
        raise TorchslimError(f"model file not found: {path}; check the path")
    if path.is_dir():
        raise TorchslimError(f"{path} is a directory, not a model file; pass the file inside it")
    require_regular(path, "model file")
    size = path.stat().st_size
    if size == 0:
        raise TorchslimError(f"model file {path} is empty (0 bytes); re-export the model")
    return size


def load_model(
    path: str | Path,
    *,
    trust: bool = False,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: tuple[int, int] | None = None,
    code_paths: Iterable[Path] = (),
) -> LoadedModel:
    """Load any model file torchslim understands; the error says what to do when it can't.

    With ``trust``, the user's code is imported from ``code_paths``, the current directory
    and the model file's folder (see usercode.py).
    """
    path = Path(path)
    size = _check_readable(path)
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, size, trust)
    if path.suffix.lower() == ".pt2":
        from .artifact import load_exported

        return load_exported(path, size, trust)
    if is_zip(path) and _is_torchscript(path):
        return _load_torchscript(path, size, trust)
    ctx = _Ctx(trust, arch, num_classes, in_channels, input_size, tuple(code_paths))
    return _load_pickle_family(path, size, ctx)


@dataclass(frozen=True)
class _Ctx:
    """What a pickle/state_dict load needs beyond the path."""

    trust: bool
    arch: str | None
    num_classes: int | None
    in_channels: int | None
    input_size: tuple[int, int] | None
    code_paths: tuple[Path, ...]


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except Exception:  # a broken zip: the pickle path's checks say what is wrong with it
        return False


def _load_torchscript(path: Path, size: int, trust: bool) -> LoadedModel:
    """TorchScript is code: its scripted methods run at load (``__setstate__``) and on every
    call, so like a pickle it loads only with --trust."""
    if not trusted(trust):
        raise TorchslimError(f"{path} is TorchScript, which runs the code inside it; "
                             f"{TRUST_HINT}")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # the C++ reader raises RuntimeError, UnicodeDecodeError, ...
        raise TorchslimError(f"{path} is not a readable TorchScript file "
                             f"({_first_line(exc)}); re-export it") from exc
    return LoadedModel(model.eval(), "torchscript", path, ModelMeta(), size)


def _load_onnx(path: Path, size: int, trust: bool = False) -> LoadedModel:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise TorchslimError(f"{path} is not a readable ONNX file ({_first_line(exc)})") from exc
    try:
        check_onnx(proto, path.parent)
    except AlteredFile as exc:
        raise TorchslimError(f"{path} {ALTERED} ({exc})") from exc
    check_onnx_loops(proto, path, trusted(trust))
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        meta = _meta_of({"meta": json.loads(props["torchslim"])}, path) \
            if "torchslim" in props else None
    except ValueError as exc:  # not JSON
        raise TorchslimError(f"{path} {ALTERED} (its metadata is malformed)") from exc
    return LoadedModel(None, "onnx", path, meta or ModelMeta(), size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _safe_load(path: Path) -> Any:
    """Unpickle without running code: safeload checks the opcodes first (no constructor the
    file chooses, storages no bigger than the file), then torch loads with weights_only."""
    _import_torchslim_models()
    return load_checked(path, safe_classes())


def refusal(path: Path, exc: AlteredFile) -> str:
    """The one line for a file the opcode check refused."""
    if isinstance(exc, UnreadableFile):
        return f"{path} is not a readable PyTorch file ({exc}); re-save the model"
    return f"{path} {ALTERED} ({exc})"


def _load_pickle_family(path: Path, size: int, ctx: _Ctx) -> LoadedModel:
    try:
        obj = _safe_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
            check_attributes(obj["model"], path)  # what lowrank/swap size new layers from
        elif isinstance(obj, nn.Module):
            check_attributes(obj, path)
    except NeedsTrust as exc:
        if not trusted(ctx.trust):
            raise TorchslimError(_needs_trust(path)) from exc
        obj = _trusted_load(path, ctx.code_paths)
    except AlteredFile as exc:
        if not trusted(ctx.trust):
            raise TorchslimError(refusal(path, exc)) from exc
        obj = _trusted_load(path, ctx.code_paths)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a pickled class: a broken file
            msg = f"{path} is not a readable PyTorch file (not a pickle torch can read)"
            raise TorchslimError(msg) from exc
        if not trusted(ctx.trust):
            raise TorchslimError(_needs_trust(path)) from exc
        obj = _trusted_load(path, ctx.code_paths)
    except (KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
        raise TorchslimError(f"{path} is not a readable PyTorch file; re-save the model") from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise TorchslimError(
            f"{path} is corrupt or truncated ({_first_line(exc)}); re-save the model"
        ) from exc
    return _interpret(obj, path, size, ctx)


def _needs_trust(path: Path) -> str:
    from .usercode import pickle_globals, user_classes

    needed = user_classes(pickle_globals(path))
    what = f"code outside torch and torchslim ({', '.join(needed[:6])})" if needed else \
        "pickled Python objects"
    where = "; with --trust, torchslim imports it from the current directory, the model's " \
            "folder or --code-path DIR" if needed else ""
    return f"{path} holds {what}; {TRUST_HINT}{where}"


def _trusted_load(path: Path, code_paths=()) -> Any:
    from .usercode import add_import_paths, env_code_paths, explain_unpickle_error

    searched = add_import_paths(path, [*code_paths, *env_code_paths()])
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary pickles fail in arbitrary ways
        raise TorchslimError(explain_unpickle_error(exc, path, searched)) from exc


def _interpret(obj, path: Path, size: int, ctx: _Ctx) -> LoadedModel:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        meta, model = _meta_of(obj, path), obj.get("model")
        if not isinstance(model, nn.Module):
            raise TorchslimError(f"{path} {ALTERED} (its model is a {type(model).__name__})")
        return LoadedModel(model.eval(), "torchslim", path, meta, size)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickle", path, ModelMeta(), size)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        model, meta = _from_state_dict(obj, path, ctx)
        return LoadedModel(model.eval(), "state_dict", path, meta, size)
    raise TorchslimError(
        f"{path} holds a {type(obj).__name__}, not a model; save the nn.Module, its "
        "state_dict, or a TorchScript/ONNX export"
    )


def _meta_of(obj: dict, path: Path) -> ModelMeta:
    try:
        meta = ModelMeta.from_dict(obj.get("meta"))
        json.dumps(meta.to_dict())  # reports print it: plain JSON data or refuse now
        return meta
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise TorchslimError(f"{path} {ALTERED} (its metadata is malformed)") from exc


def _from_state_dict(state, path, ctx: _Ctx):
    if not ctx.arch:
        raise TorchslimError(
            f"{path} is a state_dict (weights only); pass --arch NAME (see `torchslim models`) "
            "or --arch module:Class to say which architecture it belongs to"
        )
    num_classes = ctx.num_classes or _infer_classes(state)
    model, spec = _build_arch(ctx, num_classes, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TorchslimError(
            f"{path} does not fit --arch {ctx.arch} ({_first_line(exc)}); check --arch, "
            "--num-classes, --in-channels and --input-size"
        ) from exc
    shape = (ctx.in_channels or 1, *ctx.input_size) if ctx.input_size else None
    return model, ModelMeta(arch=spec, input_shape=shape)


def _infer_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The last 2-D weight's rows are the class count in every classifier we know."""
    mats = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(mats[-1].shape[0]) if mats else None


def _build_arch(ctx: _Ctx, num_classes, path: Path):
    kwargs = {
        k: v
        for k, v in {
            "num_classes": num_classes,
            "in_channels": ctx.in_channels,
            "input_size": tuple(ctx.input_size) if ctx.input_size else None,
        }.items()
        if v is not None
    }
    arch = ctx.arch
    if ":" in arch:
        if not trusted(ctx.trust):
            raise TorchslimError(f"--arch {arch} imports and runs your code; {TRUST_HINT}")
        cls = _import_class(arch, path, ctx.code_paths)
        accepted = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return cls(**kwargs), {"name": arch, "kwargs": kwargs}
    from ..models.registry import create_model

    return create_model(arch, **kwargs), {"name": arch, "kwargs": kwargs}


def _import_class(spec: str, path: Path | None = None, code_paths=()) -> type:
    import importlib

    from .usercode import CODE_HINT, add_import_paths, env_code_paths

    searched = add_import_paths(path, [*code_paths, *env_code_paths()])
    module_name, _, cls_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot import --arch {spec}: module {exc.name!r} not found (searched "
                         f"{', '.join(searched)}); {CODE_HINT}") from exc
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import --arch {spec}: {_first_line(exc)}") from exc


TRANSFORMS = {"exported": ("quantize",)}  # what a non-eager kind still allows


def require_module(loaded: LoadedModel, command: str) -> nn.Module:
    """The eager nn.Module behind a file, or an error naming what this command can't do."""
    if loaded.kind in ("torchscript", "onnx", "exported") and \
            command not in TRANSFORMS.get(loaded.kind, ()):
        can = {"exported": "`report` measures it and `quantize` converts it"}.get(
            loaded.kind, "only `report` measures it")
        kind = {"exported": "torch.export (.pt2)", "onnx": "ONNX"}.get(loaded.kind, loaded.kind)
        raise TorchslimError(
            f"`torchslim {command}` cannot transform a {kind} file ({loaded.path}): "
            f"{can}, but its layers are no longer modules to change. Pass the eager model "
            "(a torchslim .pt, a pickle with --trust, or a state_dict + --arch) instead"
        )
    return loaded.model


# --- saving ---------------------------------------------------------------------------


def check_output(path: str | Path, *, force: bool = False, inputs: Iterable = ()) -> Path:
    """Refuse to write over an input, or over an existing file without --force."""
    path = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and path.exists() and path.samefile(src):
            raise TorchslimError(f"output {path} is an input file; choose another -o path")
    if path.is_dir():
        raise TorchslimError(f"output {path} is a directory; give a file name")
    if path.exists() and not force:
        raise TorchslimError(f"output {path} exists; pass --force to replace it")
    if not path.parent.exists():
        raise TorchslimError(f"output folder {path.parent} does not exist; create it first")
    return path


def atomic_write(
    path: str | Path,
    write: Callable[[Path], None],
    *,
    force: bool = False,
    inputs: Iterable = (),
) -> Path:
    """Call ``write(tmp)`` then rename onto ``path``, so a crash never leaves half a file."""
    path = check_output(path, force=force, inputs=inputs)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    except RuntimeError as exc:  # torch.save reports a failed write as RuntimeError
        if "write" not in str(exc).lower() and not _disk_full(path.parent):
            raise
        raise write_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    WRITTEN.append(path)
    return path


def write_error(path: Path, exc: BaseException) -> TorchslimError:
    """One line for a write that failed: full disk, read-only folder, no permission."""
    folder = Path(path).parent
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _disk_full(folder)):
        why = f"the disk holding {folder} is full; free some space"
    elif code == errno.EROFS:
        why = f"{folder} is on a read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        why = f"no permission to write in {folder}"
    else:
        why = _first_line(exc)
    return TorchslimError(f"could not write {path}: {why}; nothing was written there, choose "
                          "another -o folder or fix this one")


def _disk_full(folder: Path) -> bool:
    """Under 1 MiB free: torch.save's errors on a full disk do not say so (``unexpected
    pos``), so this tells a full disk from a bug."""
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def save_model(
    model: nn.Module,
    path: str | Path,
    meta: ModelMeta,
    *,
    force: bool = False,
    inputs: Iterable = (),
) -> Path:
    """Write torchslim's own format. A model of torch/torchslim classes only reloads with
    :func:`load_model` and no --trust; one that holds the user's own classes records them in
    ``meta.requires`` and, like the pickle it came from, reloads with --trust."""
    from .usercode import check_importable, class_names

    _import_torchslim_models()
    meta.requires = class_names(model, set(safe_classes()))
    check_importable(meta.requires)
    meta.torchslim_version = __version__
    payload = {"format": FORMAT, "model": model.eval(), "meta": meta.to_dict()}

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        _check_reloads(tmp, bool(meta.requires))

    return atomic_write(path, write, force=force, inputs=inputs)


def _check_reloads(tmp: Path, user_code: bool) -> None:
    """Prove the promise before the file is renamed into place: it loads again, without
    --trust when it holds only torch/torchslim classes."""
    try:
        if user_code:
            torch.load(tmp, map_location="cpu", weights_only=False)
        else:
            _safe_load(tmp)
    except (pickle.UnpicklingError, AlteredFile, NeedsTrust) as exc:
        raise TorchslimError(
            f"model holds objects torchslim cannot reload safely ({_first_line(exc)}); "
            "save it with torch.save and load it with --trust"
        ) from exc
    except (ImportError, AttributeError) as exc:
        raise TorchslimError(f"the saved model would not load again ({_first_line(exc)}); "
                             "its classes must be importable from a module") from exc


def requires_trust(meta: ModelMeta) -> bool:
    return bool(meta.requires)
