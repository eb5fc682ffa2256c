"""Same-runtime baselines: a torch model measured in eager PyTorch and, through an fp32 ONNX
export, in ONNX Runtime, so an int8 ONNX file is compared with fp32 on its own runtime and with
the fastest fp32 runtime, not only with eager PyTorch (`report --runtime`, `compress`, `demo`).

Exporting takes seconds, so exports are cached: one file per model content, in
``$TORCHSLIM_CACHE_DIR`` or else ``$XDG_CACHE_HOME/torchslim`` (``~/.cache/torchslim``), under
``onnx/``. The key is the SHA-256 of the model file plus everything else the export depends
on (file kind, architecture, input shape, torch and torchslim versions), so an edited model or
a new torch never reuses a stale export. Beside each entry a record (``.onnx.json``) keeps the
key and the entry's own SHA-256, checked before every use: an entry that fails (planted,
edited, truncated) is rebuilt, with a note. The folder is created 0700, and one that other
users can write is not used. Entries are written atomically and never expire; delete the
folder at any time. Where the cache cannot be written, the export goes to a
temporary folder for the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import __version__
from .errors import TorchslimError, UsageError
from .inputs import InputSpec, as_spec, resolve
from .io import LoadedModel, atomic_write, load_model
from .measure import DEFAULT_MIN_RUN_TIME, Measurement, measure

CACHE_ENV = "TORCHSLIM_CACHE_DIR"
RUNTIMES = ("torch", "onnxruntime", "all")


def measure_runtimes(loaded: LoadedModel, runtime: str = "torch", *, name: str | None = None,
                     inputs=None, data=None, threads: int | None = None,
                     batch_size: int = 32, min_run_time: float | None = None,
                     layers: bool = False, use_cache: bool = True) -> list[Measurement]:
    """Measure ``loaded`` in the runtime(s) asked for: ``torch`` (eager PyTorch),
    ``onnxruntime`` (an fp32 ONNX export, cached) or ``all``. An ONNX file always runs in
    ONNX Runtime, its only runtime. ``inputs`` is an InputSpec or a (C, H, W) shape (default:
    the file's metadata, then the data). ``layers`` adds a per-layer profile to each record."""
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    name = name or loaded.name
    kw = {"data": data, "threads": threads, "batch_size": batch_size,
          "min_run_time": min_run_time}
    spec = as_spec(inputs)
    if loaded.kind == "onnx" or loaded.model is None or runtime == "torch":
        return [_measure(loaded, name, spec, layers, kw)]
    records = [_measure(loaded, name, spec, layers, kw)] if runtime == "all" else []
    spec = resolve(spec, InputSpec.parse(records[0].inputs) if records else None,
                   loaded.meta.input_spec(), getattr(data, "inputs", None), model=loaded.model)
    if spec is None:
        raise TorchslimError(f"no input shape known for {name}: pass --input-shape C,H,W "
                             "(or --input SHAPE:DTYPE per input, or --data)")
    cache_notes: list[str] = []
    with fp32_onnx(loaded, spec, use_cache=use_cache, notes=cache_notes) as path:
        rec = _measure(load_model(path), name, spec, layers, kw)
        cached = use_cache and path.parent == cache_dir() / "onnx"
    where = f"cached as {path}" if cached else "exported for this run"
    rec.notes += [*cache_notes, f"measured in onnxruntime through an fp32 ONNX export ({where})"]
    return [*records, rec]


def _measure(target, name, spec, layers: bool, kw) -> Measurement:
    rec = measure(target, name=name, inputs=spec, **kw)
    if layers:
        from .profile import profile_layers

        run_time = kw["min_run_time"] or DEFAULT_MIN_RUN_TIME
        rec.layers = profile_layers(target, inputs=InputSpec.parse(rec.inputs),
                                    threads=rec.threads, min_run_time=run_time,
                                    whole_ms=rec.latency_ms_median)
    return rec


def cache_dir() -> Path:
    """Where exports are kept (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "torchslim"


def export_key(loaded: LoadedModel, spec: InputSpec) -> str:
    """SHA-256 of the model file and of what else the export depends on."""
    digest = hashlib.sha256()
    if loaded.path is not None:
        with open(loaded.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:  # an in-memory model: its weights and structure stand for the file
        digest.update(repr(loaded.model).encode())
        for k, v in loaded.model.state_dict().items():
            digest.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    context = {"kind": loaded.kind, "arch": loaded.meta.arch, "inputs": spec.texts(),
               "torch": torch.__version__, "torchslim": __version__}
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@contextmanager
def fp32_onnx(loaded: LoadedModel, inputs, *, use_cache: bool = True,
              notes: list[str] | None = None) -> Iterator[Path]:
    """An fp32 ONNX file of ``loaded``'s torch model for ``inputs`` (an InputSpec or a
    (C, H, W) shape), from the cache or exported now, with its metadata and MACs recorded so
    a measurement of it shows them. What the cache did that a reader should know (an entry
    that failed verification and was rebuilt, a folder others can write) goes to ``notes``."""
    if loaded.model is None or loaded.kind == "onnx":
        raise TorchslimError(f"{loaded.path} is already an ONNX file; it needs no export")
    notes = notes if notes is not None else []
    spec = resolve(inputs, model=loaded.model)
    stem = loaded.path.stem if loaded.path is not None else "model"
    cached = None
    if use_cache:
        key = export_key(loaded, spec)
        try:
            cached = _private_folder(cache_dir() / "onnx") / f"{stem}-{key[:24]}.onnx"
            bad = _verify(cached, key) if cached.exists() else None
            if bad:
                notes.append(f"cache entry {cached.name} {bad}: rebuilt")
            if bad or not cached.exists():
                _export(loaded, spec, cached)
                _record(cached, key)
        except _Unsafe as exc:
            notes.append(f"{exc}; exported for this run instead")
            cached = None
        except OSError:  # read-only home, full disk: export for this run only
            cached = None
    if cached is not None:
        yield cached
        return
    with tempfile.TemporaryDirectory(prefix="torchslim-onnx-") as tmp:
        yield _export(loaded, spec, Path(tmp) / f"{stem}.onnx")


class _Unsafe(Exception):
    """The cache folder is not private to this user: its entries could be planted."""


def _private_folder(folder: Path) -> Path:
    """``folder``, created 0700; an existing one must be this user's and not writable by
    others (where another user could plant an export that reports fake numbers)."""
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.mkdir(exist_ok=True, mode=0o700)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise _Unsafe(f"cache folder {folder} is not private to this user "
                      f"(mode {st.st_mode & 0o777:o}, owner uid {st.st_uid})")
    if st.st_mode & 0o077:
        folder.chmod(0o700)
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".json")


def _record(entry: Path, key: str) -> None:
    """What the entry was made from and its own hash, written when it is made."""
    text = json.dumps({"source": key, "sha256": _sha256(entry)})
    atomic_write(_record_path(entry), lambda t: t.write_text(text), force=True)


def _verify(entry: Path, key: str) -> str | None:
    """Why ``entry`` cannot be used, or None when it is what torchslim made from ``key``."""
    try:
        rec = json.loads(_record_path(entry).read_text())
    except (OSError, ValueError):
        return "has no record of its making"
    if not isinstance(rec, dict) or rec.get("source") != key:
        return "was made from another model"
    if not entry.is_file() or _sha256(entry) != rec.get("sha256"):
        return "changed after it was made"
    return None


def _export(loaded: LoadedModel, spec: InputSpec, dst: Path) -> Path:
    from . import onnx_quant as oq
    from .measure import count_macs

    module = copy.deepcopy(loaded.model).float().eval()
    try:
        macs = int(count_macs(module, spec.example(1)))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        macs = None  # the export still runs; the row shows no MACs
    meta = copy.deepcopy(loaded.meta)
    meta.set_input_spec(spec)
    with tempfile.TemporaryDirectory(prefix="torchslim-export-") as tmp:
        try:
            raw = oq.export_onnx(module, spec, Path(tmp) / "raw.onnx")
        except TorchslimError as exc:
            raise TorchslimError(f"cannot measure {loaded.name} in onnxruntime: {exc}; or "
                                 "measure it with --runtime torch") from exc
        final = oq.write_metadata(raw, Path(tmp) / "final.onnx", meta.to_dict(), macs=macs)
        return atomic_write(dst, lambda t: t.write_bytes(final.read_bytes()), force=True)
