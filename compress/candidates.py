"""Search candidates: one point of the search space, built with shared work and measured.

A candidate is (architecture swap, pruning ratio, recovery epochs, final precision). What
candidates share is built once: the swapped model is made once and every pruning level
starts from it; a trained fp32 model is reused by every precision tried on it (and kept on
disk in the work folder, so a resumed search does not train it again); the int8 diagnosis
of a trained model is computed once for every "keep k layers in fp32" variant.

Every candidate is measured on the artifact file it would ship as (size, MACs, latency),
scored on the validation split (what the search chooses on) and on the held-out test split
(what is reported). Its recipe is the list of method configs that rebuilds it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from . import onnx_quant as oq
from .config import config_to_dict
from .data import DataSplit, stratified_split
from .device import TrainDevice
from .distill import DistillConfig, distill
from .errors import TorchslimError
from .io import ModelMeta, history_entry, load_model, save_model
from .measure import measure
from .prune import PruneConfig, prune_model
from .quantize import QuantizeConfig, diagnose, quantize_model
from .swap import SwapConfig, swap_model
from .train import evaluate

SWAPS = ("none", "dws", "dws-hard")  # keep / depthwise-separable / plus hard activations
PRECISIONS = ("fp32", "fp16", "int8", "int8-mixed", "qat")
# What each output kind can hold: an .onnx output runs in ONNX Runtime, a .pt in torch.
PRECISIONS_FOR = {".onnx": ("fp32", "int8", "int8-mixed", "qat"), ".pt": ("fp32", "fp16")}
SOFT_ACTS = (nn.SiLU, nn.Sigmoid, nn.GELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid)


class Stop(Exception):
    """The time budget or the trial count is spent: stop searching, keep what was found."""


@dataclass(frozen=True)
class Spec:
    """One point of the search space."""

    swap: str = "none"
    prune: float = 0.0  # fraction of channels removed (0: no pruning)
    epochs: int = 0  # distillation epochs from the input model after swap/prune
    precision: str = "fp32"
    keep_fp32: int = 0  # int8-mixed: this many layers that add the most int8 noise stay fp32

    @property
    def key(self) -> str:
        keep = f"-keep{self.keep_fp32}" if self.precision == "int8-mixed" else ""
        return f"{self.trained_key}-{self.precision}{keep}"

    @property
    def trained_key(self) -> str:
        """The fp32 model this candidate is made from (shared by its precisions)."""
        if self.swap == "none" and self.prune == 0:
            return "input"
        return f"{self.swap}-p{self.prune:.2f}-e{self.epochs}"

    @property
    def changes_architecture(self) -> bool:
        return self.swap != "none" or self.prune > 0

    def label(self) -> str:
        parts = {"none": [], "dws": ["swap"], "dws-hard": ["swap+hard"]}[self.swap]
        if self.prune:
            parts.append(f"prune {self.prune:g}")
        if self.changes_architecture:
            parts.append(f"distill {self.epochs}")
        prec = f"int8, {self.keep_fp32} fp32" if self.precision == "int8-mixed" else \
            self.precision
        return " + ".join(parts + [prec])


# Weight of the teacher's soft loss when the search recovers a pruned/swapped copy (1 - alpha
# goes to the labels). Measured on PDModel (digits 60x120, prune 0.6, distill 12): alpha 0.7
# (distill's default) ended 1.1-2.8 points below the input on validation (lr 3e-3 to 3e-4),
# 0.3 ended 0.56 above, its validation loss lower at every epoch (last five: 0.17-0.18
# against 0.23-0.24).
DISTILL_ALPHA = 0.3


def recipe(spec: Spec, seed: int = 0, exclude: tuple[str, ...] = (),
           qat_epochs: int = 3, alpha: float = DISTILL_ALPHA) -> list:
    """The method configs that rebuild ``spec`` (what --dump-recipe writes)."""
    steps: list = []
    if spec.swap != "none":
        steps.append(SwapConfig(conv="depthwise-separable",
                                act="hard" if spec.swap == "dws-hard" else "none"))
    if spec.prune > 0:
        steps.append(PruneConfig(ratio=spec.prune, seed=seed))
    if spec.changes_architecture and spec.epochs > 0:
        steps.append(DistillConfig(epochs=spec.epochs, seed=seed, alpha=alpha))
    q = quantize_config(spec, seed, exclude, qat_epochs)
    return steps + ([q] if q is not None else [])


def quantize_config(spec: Spec, seed: int, exclude=(), qat_epochs: int = 3):
    if spec.precision == "fp32":
        return None
    if spec.precision == "fp16":
        return QuantizeConfig(mode="fp16", seed=seed)
    if spec.precision == "qat":
        return QuantizeConfig(mode="qat", qat_epochs=qat_epochs, seed=seed)
    return QuantizeConfig(mode="static", exclude=tuple(exclude), seed=seed)


def has_soft_activations(model: nn.Module) -> bool:
    """Whether --act hard would change anything (ReLU-only models have nothing to swap)."""
    return any(isinstance(m, SOFT_ACTS) for m in model.modules())


# --- the three-way split ----------------------------------------------------------------


def search_split(base: DataSplit, test_share: float = 0.5, seed: int = 0) -> DataSplit:
    """Train / validation (chooses) / test (reports), none of it seen by the input model.

    ``base`` is the split every torchslim command makes for ``seed`` (``load_data`` with its
    default validation fraction): a model trained with `torchslim train` never trained on
    its validation images. Those held-out images are split, stratified, into the search's
    validation and test sets, and the search trains on ``base.train`` only. A data set with
    its own test split (Fashion-MNIST's official one) keeps it, and its validation set. (Carving a
    test set from all the data instead would put images the input model trained on into
    the test set, and report the memorised accuracy of the baseline as its test accuracy.)
    """
    if base.test is not None:  # an official test split (Fashion-MNIST): it reports
        return base
    tensors = base.val.tensors
    val_idx, test_idx = held_out_indices(tensors[-1], test_share, seed)
    return dataclasses.replace(base, val=TensorDataset(*[t[val_idx] for t in tensors]),
                               test=TensorDataset(*[t[test_idx] for t in tensors]))


def held_out_indices(y: torch.Tensor, test_share: float, seed: int):
    """(validation, test) positions in a held-out set: stratified, disjoint, complete."""
    if not 0.0 < test_share < 1.0:
        raise TorchslimError(f"--test-share must be in (0, 1), got {test_share}")
    val_idx, test_idx = stratified_split(y, test_share, seed + 104729)
    if len(val_idx) == 0 or len(test_idx) == 0:
        raise TorchslimError("the held-out split is too small to divide into validation and "
                             "test; use more data")
    return val_idx, test_idx


# --- building and measuring ---------------------------------------------------------------


@dataclass
class Context:
    """What every candidate of one search shares."""

    teacher: nn.Module  # the input model, fp32, eval
    meta: ModelMeta  # its metadata (input shape, classes, history)
    data: DataSplit  # the three-way split
    workdir: Path
    suffix: str  # ".onnx" or ".pt": what the output file is
    seed: int = 0
    trust: bool = False  # the input was loaded with --trust (its classes may be the user's)
    threads: int | None = None
    min_run_time: float | None = None
    qat_epochs: int = 3
    distill_alpha: float = DISTILL_ALPHA
    say: Callable[[str], None] = lambda _msg: None
    training: Callable[[str], AbstractContextManager] | None = None
    on_epoch_seconds: Callable[[float], None] | None = None
    check_time: Callable[[], None] = lambda: None  # raises when the time budget is spent
    device: TrainDevice | None = None  # where the fine-tunes train; measuring stays on CPU


class Builder:
    """Builds candidates with shared work, measures them, returns their records."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.parents: dict[str, nn.Module] = {}
        self.trained: dict[str, nn.Module] = {}
        self.diagnoses: dict[str, object] = {}
        self.failures: dict[str, TorchslimError] = {}
        for sub in ("models", "artifacts"):
            (ctx.workdir / sub).mkdir(parents=True, exist_ok=True)

    # -- shared pieces ------------------------------------------------------------------
    def parent(self, swap: str) -> nn.Module:
        if swap not in self.parents:
            if swap == "none":
                self.parents[swap] = self.ctx.teacher
            else:
                self.ctx.say(f"swapping ({swap}), shared by every pruning level")
                cfg = recipe(Spec(swap=swap))[0]
                example = self.ctx.data.head(256)
                self.parents[swap] = self._once(
                    f"swap:{swap}", lambda: swap_model(self.ctx.teacher, cfg, example)[0])
        return self.parents[swap]

    def fp32_model(self, spec: Spec) -> nn.Module:
        key = spec.trained_key
        if key in self.trained:
            return self.trained[key]
        path = self.ctx.workdir / "models" / f"{key}.pt"
        if key != "input" and path.exists():
            # the work folder's own files; ones holding the user's classes were written from
            # a model the user trusted
            model = load_model(path, trust=self.ctx.trust).model.eval()
        else:
            model = self._once(key, lambda: self._train(spec, path))
        self.trained[key] = model
        return model

    def _once(self, key: str, make: Callable[[], nn.Module]) -> nn.Module:
        """``make()``, remembering a failure: the precisions tried on a model that could
        not be built fail at once with the same reason instead of building it again."""
        if key in self.failures:
            raise self.failures[key]
        try:
            return make()
        except Stop:  # the budget, not the model: the next run builds it
            raise
        except TorchslimError as exc:
            self.failures[key] = exc
            raise
        except Exception as exc:  # swap/prune/train raise many types; the reason matters
            self.failures[key] = TorchslimError(f"{type(exc).__name__}: {exc}")
            raise self.failures[key] from exc

    def _train(self, spec: Spec, path: Path) -> nn.Module:
        model = self.parent(spec.swap)
        if not spec.changes_architecture:
            return model
        data, seed = self.ctx.data, self.ctx.seed
        if spec.prune > 0:
            self.ctx.say(f"pruning {spec.prune:g} of the channels")
            model, _ = prune_model(model, PruneConfig(ratio=spec.prune, seed=seed),
                                   data.head(1), data=data)
        model = copy.deepcopy(model)
        if spec.epochs > 0:
            model = self._distill(model, spec)
        save_model(model, path, self._meta(spec), force=True)
        return model.eval()

    def _distill(self, model: nn.Module, spec: Spec) -> nn.Module:
        cfg = next(c for c in self._recipe(spec) if c.method == "distill")
        title = f"distilling {spec.trained_key}"
        ctx = self.ctx.training(title) if self.ctx.training else nullcontext(None)
        start = time.perf_counter()
        with ctx as callbacks:
            callbacks = _with_time_check(callbacks, self.ctx.check_time)
            model, _ = distill(self.ctx.teacher, model, self.ctx.data, cfg, callbacks)
        if self.ctx.on_epoch_seconds:
            self.ctx.on_epoch_seconds((time.perf_counter() - start) / spec.epochs)
        return model

    def _meta(self, spec: Spec, configs=None) -> ModelMeta:
        meta = copy.deepcopy(self.ctx.meta)
        for cfg in configs if configs is not None else self._recipe(spec):
            if cfg.method != "quantize":
                meta.history.append(history_entry(cfg.method, config_to_dict(cfg), {}, {},
                                                  ["built by torchslim's search"]))
        return meta

    def _recipe(self, spec: Spec, exclude: tuple[str, ...] = ()) -> list:
        steps = recipe(spec, self.ctx.seed, exclude, self.ctx.qat_epochs, self.ctx.distill_alpha)
        if self.ctx.device is None:
            return steps
        # the fine-tunes (distill, qat) train where --device says; everything is measured
        # on the CPU
        return [dataclasses.replace(c, **self.ctx.device.train_kwargs())
                if c.method in ("distill", "quantize") else c for c in steps]

    def diagnosis(self, spec: Spec):
        """Per-layer int8 error of the trained model (computed once per trained model)."""
        key = spec.trained_key
        if key not in self.diagnoses:
            self.ctx.say(f"diagnosing int8 error per layer of {key}")
            cfg = QuantizeConfig(mode="static", seed=self.ctx.seed)
            self.diagnoses[key] = diagnose(self.fp32_model(spec), cfg,
                                           self.ctx.meta.input_spec(), self.ctx.data.train)
        return self.diagnoses[key]

    # -- one candidate ------------------------------------------------------------------
    def build(self, spec: Spec) -> tuple[Path, list, dict]:
        """Write ``spec``'s artifact into the work folder; return (path, its recipe, extra
        record fields)."""
        model = self.fp32_model(spec)
        exclude: tuple[str, ...] = ()
        extra: dict = {}
        if spec.precision == "int8-mixed":
            diag = self.diagnosis(spec)
            exclude = tuple(diag.worst(spec.keep_fp32))
            extra["int8_diagnosis"] = {**diag.to_dict(), "kept_fp32": list(exclude)}
        configs = self._recipe(spec, exclude)
        out = self.ctx.workdir / "artifacts" / f"{spec.key}{self.ctx.suffix}"
        meta = self._meta(spec, configs)
        qcfg = next((c for c in configs if c.method == "quantize"), None)
        if qcfg is not None:
            self.ctx.say(f"quantizing {spec.key}")
            res = quantize_model(model, qcfg, out_path=out, data=self.ctx.data, meta=meta,
                                 inputs=self.ctx.meta.input_spec(), force=True)
            return res.path, configs, extra
        if self.ctx.suffix == ".onnx":
            _export_fp32(model, meta, out)
        else:
            save_model(model, out, meta, force=True)
        return out, configs, extra

    def measure(self, spec: Spec, path: Path, configs: list) -> dict:
        """The candidate's record: measured on its artifact file, scored on val and test."""
        self.ctx.say(f"measuring {spec.key}")
        loaded = load_model(path, trust=self.ctx.trust)
        m = measure(loaded, name=spec.label(), inputs=self.ctx.meta.input_spec(),
                    data=self.ctx.data, threads=self.ctx.threads,
                    min_run_time=self.ctx.min_run_time)
        return {
            "key": spec.key, "label": spec.label(), "spec": dataclasses.asdict(spec),
            "recipe": [config_to_dict(c) for c in configs],
            "params": m.params, "macs": m.macs, "file_bytes": path.stat().st_size,
            "latency_ms_median": m.latency_ms_median, "latency_ms_p90": m.latency_ms_p90,
            "runtime": m.runtime, "val_accuracy": m.accuracy,
            "test_accuracy": test_accuracy(path, self.ctx.data, self.ctx.trust),
            "artifact": str(path),
        }


def test_accuracy(path: Path, data: DataSplit, trust: bool = False) -> float:
    """Top-1 % of the artifact file on the held-out test split, as any user would run it."""
    loaded = load_model(path, trust=trust)
    fn = oq.OnnxRunner(path) if loaded.kind == "onnx" else loaded.model
    return float(evaluate(fn, data.test)[0])


def _export_fp32(model: nn.Module, meta: ModelMeta, out: Path) -> Path:
    """fp32 ONNX with torchslim's metadata: the fp32 point of an ONNX Runtime search."""
    import tempfile

    from .measure import count_macs

    spec = meta.input_spec()
    macs = count_macs(model, spec.example(1))
    with tempfile.TemporaryDirectory(prefix="torchslim-fp32-") as tmp:
        raw = oq.export_onnx(copy.deepcopy(model).float(), spec, Path(tmp) / "raw.onnx")
        oq.write_metadata(raw, out, meta.to_dict(), macs=macs)
    return out


def _with_time_check(callbacks, check: Callable[[], None]):
    """Wrap the progress callbacks so a spent time budget stops training mid-epoch."""
    from .train import Callbacks

    cb = callbacks or Callbacks()
    inner = cb.on_step

    def on_step(epoch: int, step: int, loss: float) -> None:
        check()
        if inner:
            inner(epoch, step, loss)

    return Callbacks(cb.on_start, on_step, cb.on_epoch, cb.on_checkpoint)


def read_records(path: Path) -> dict[str, dict]:
    """Candidates measured by an earlier run (one JSON object per line, artifacts relative
    to the work folder; a line cut short by an interruption is ignored). A candidate that
    failed is kept too: a rerun does not try it again."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        artifact = path.parent / str(rec.get("artifact", "")) if isinstance(rec, dict) else None
        if artifact is not None and "key" in rec and (rec.get("failed") or artifact.is_file()):
            out[rec["key"]] = rec
    return out


def append_record(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()


def baseline_record(loaded, ctx: Context) -> dict:
    """The input model as given, measured like every candidate (its own runtime)."""
    m = measure(loaded, name=f"{loaded.name} (input)", inputs=ctx.meta.input_spec(),
                data=ctx.data, threads=ctx.threads, min_run_time=ctx.min_run_time)
    return {"key": "baseline", "label": f"{loaded.name} (input)", "params": m.params,
            "macs": m.macs, "file_bytes": loaded.file_bytes or m.file_bytes,
            "latency_ms_median": m.latency_ms_median, "latency_ms_p90": m.latency_ms_p90,
            "runtime": m.runtime, "val_accuracy": m.accuracy,
            "test_accuracy": float(evaluate(ctx.teacher, ctx.data.test)[0])}


def spec_from_recipe(configs: list) -> Spec:
    """The search point a recipe describes (recipes the search wrote, --dump-recipe)."""
    by = {c.method: c for c in configs}
    if len(by) != len(configs) or set(by) - {"swap", "prune", "distill", "quantize"}:
        raise TorchslimError("with --max-acc-drop, --recipe must be one the search wrote "
                             "(at most one swap, prune, distill and quantize step)")
    swap = "none"
    if "swap" in by:
        s = by["swap"]
        if s.conv != "depthwise-separable" or s.act not in ("none", "hard"):
            raise TorchslimError("with --max-acc-drop, a recipe's swap must be "
                                 "depthwise-separable (act none or hard)")
        swap = "dws-hard" if s.act == "hard" else "dws"
    prune = by["prune"].ratio if "prune" in by else 0.0
    if "prune" in by and prune is None:
        raise TorchslimError("with --max-acc-drop, a recipe's prune step needs a ratio")
    epochs = by["distill"].epochs if "distill" in by else 0
    q = by.get("quantize")
    modes = {None: "fp32", "fp16": "fp16", "static": "int8", "qat": "qat"}
    mode = q.mode if q is not None else None
    if mode not in modes:
        raise TorchslimError(f"with --max-acc-drop, quantize mode {mode} is not searchable; "
                             "use static, qat or fp16")
    precision = "int8-mixed" if mode == "static" and q.exclude else modes[mode]
    return Spec(swap, float(prune), epochs, precision, len(q.exclude) if q else 0)
