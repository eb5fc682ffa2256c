"""Writing a transformed model in the form the user asks for, chosen by the output's suffix.

- ``.pt``: torchslim's own file (io.save_model): the eager module, transformable again.
- ``.onnx``: fp32 ONNX, self-contained: it reloads in any process with only onnxruntime, no
  user code and no pickle, and ``report``/``quantize --mode dynamic`` read it.
- ``.pt2``: a ``torch.export`` program, for PyTorch deployment without the user's classes.
  ``torch.export.load`` unpickles its weights, so loading one needs ``--trust`` like any
  pickle; it can be measured and quantized, but its layers are no longer modules to prune.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import TorchslimError, UsageError
from .inputs import InputSpec, resolve
from .io import LoadedModel, ModelMeta, atomic_write, check_output, save_model, trusted

MODEL_SUFFIXES = (".pt", ".onnx", ".pt2")
META_FILE = "torchslim.json"  # the .pt2 archive's extra file holding ModelMeta


def check_model_output(path: Path, *, force: bool = False, inputs=()) -> Path:
    """Before any work: the suffix says a kind torchslim writes, and the path is writable."""
    if Path(path).suffix.lower() not in MODEL_SUFFIXES:
        raise UsageError(f"-o {path}: name the output .pt (torchslim, transformable), .onnx "
                         "(self-contained, needs no Python code) or .pt2 (torch.export)")
    return check_output(path, force=force, inputs=inputs)


def write_model(model: nn.Module, path: str | Path, meta: ModelMeta, *,
                spec: InputSpec | None = None, force: bool = False, inputs=()) -> Path:
    """Write ``model`` as the kind ``path``'s suffix names (atomically, never over an input)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return save_model(model, path, meta, force=force, inputs=inputs)
    spec = resolve(spec, meta.input_spec(), model=model)
    if spec is None:
        raise TorchslimError(f"writing {path} needs the model's input: pass --input-shape "
                             "C,H,W (or --input SHAPE:DTYPE per input) or --data")
    meta.set_input_spec(spec)
    if suffix == ".onnx":
        return _write_onnx(model, path, meta, spec, force, inputs)
    if suffix == ".pt2":
        return _write_exported(model, path, meta, spec, force, inputs)
    raise UsageError(f"cannot write {path}: use .pt, .onnx or .pt2")


def _write_onnx(model, path, meta, spec, force, inputs) -> Path:
    from . import onnx_quant as oq
    from .measure import count_macs

    macs = count_macs(model, spec.example(1))
    with tempfile.TemporaryDirectory(prefix="torchslim-export-") as tmp:
        raw = oq.export_onnx(model, spec, Path(tmp) / "raw.onnx")
        final = oq.write_metadata(raw, Path(tmp) / "final.onnx", meta.to_dict(), macs=macs)
        return atomic_write(path, lambda t: t.write_bytes(final.read_bytes()), force=force,
                            inputs=inputs)


def export_program(model: nn.Module, spec: InputSpec):
    """torch.export with a dynamic batch axis; errors name torch.export's own reason. The
    program is turned back into a module once, as loading it will: one that cannot be is
    refused here, not written."""
    from .onnx_quant import _root_cause, export_advice, export_args

    root, example, dynamic = export_args(model, spec)
    try:
        with torch.no_grad():
            program = torch.export.export(root, example, dynamic_shapes=dynamic)
            program.module()
            return program
    except Exception as exc:  # torch.export raises many types; its reason is what matters
        reason = _root_cause(exc)
        advice = export_advice(reason)
        if advice.startswith("make forward"):
            advice = "write .onnx or .pt instead"
        raise TorchslimError(f"cannot export the model with torch.export: {reason}; "
                             f"{advice}") from exc


def _write_exported(model, path, meta, spec, force, inputs) -> Path:
    program = export_program(model, spec)
    extra = {META_FILE: json.dumps(meta.to_dict())}
    # saved under a .pt2 name first: torch.export.save warns about any other suffix, and
    # atomic_write's temporary file ends in .tmp
    with tempfile.TemporaryDirectory(prefix="torchslim-export-") as tmp:
        raw = Path(tmp) / "model.pt2"
        torch.export.save(program, str(raw), extra_files=extra)
        return atomic_write(path, lambda t: t.write_bytes(raw.read_bytes()), force=force,
                            inputs=inputs)


def load_exported(path: Path, size: int, trust: bool) -> LoadedModel:
    """A ``.pt2`` program as a runnable module (torch.export.load unpickles: --trust)."""
    from .io import TRUST_HINT

    if not trusted(trust):
        raise TorchslimError(f"{path} is a torch.export program, whose weights torch loads "
                             f"with pickle; {TRUST_HINT}")
    extra = {META_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # corrupt archives fail in many ways
        raise TorchslimError(f"{path} is not a readable torch.export program "
                             f"({str(exc).strip().splitlines()[0][:200]})") from exc
    meta = ModelMeta.from_dict(json.loads(extra[META_FILE])) if extra[META_FILE] else ModelMeta()
    return LoadedModel(ExportedModule(program.module()), "exported", path, meta, size)


class ExportedModule(nn.Module):
    """A loaded torch.export program as an ordinary module. Its graph was exported in eval
    mode and refuses train()/eval(), so those only set this wrapper's flag."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, *xs: torch.Tensor):
        return self.graph(*xs)
