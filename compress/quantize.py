"""Quantization that runs int8 for real: `torchslim quantize`.

Routes (chosen by measurement on this project's CPU; see README "Quantization"):

- static / qat / dynamic -> ONNX Runtime: the model is exported with ``torch.onnx`` (eval
  mode, so BatchNorm folds into the convs in ORT's pre-pass), quantized to QDQ int8 and
  saved as one ``.onnx`` file that ORT runs with int8 kernels (QLinearConv, MatMulInteger...).
- weight-only / fp16 / bf16 -> torch: a torchslim ``.pt`` with smaller weights that
  reloads without --trust.

Whatever ORT leaves in fp32 is read back from the graph ORT actually runs and listed.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import onnx_quant as oq
from .config import config_to_dict, register_config
from .device import check_amp, check_device
from .errors import TorchslimError, UsageError
from .inputs import InputSpec, call, resolve
from .io import LoadedModel, ModelMeta, atomic_write, check_output, history_entry, save_model

MODES = ("static", "dynamic", "weight-only", "fp16", "bf16", "qat")
ORT_MODES = ("static", "dynamic", "qat")
BACKENDS = {m: ("onnxruntime",) if m in ORT_MODES else ("torch",) for m in MODES}
CALIBRATIONS = ("minmax", "entropy", "percentile")
REDUCE_RANGE = ("auto", "on", "off")


@register_config("quantize")
@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "static"
    # "auto" = the measured-fastest route for the mode; the torch int8 route (torchao PT2E +
    # torch.compile) is not offered: its artifact needs a compile at every load.
    backend: str = "auto"
    calib_batches: int = 8  # x calib_batch_size samples from the training split
    calib_batch_size: int = 32  # 256 samples: min/max ranges settle well before that
    per_channel: bool = True  # per-output-channel weight scales: needed for depthwise convs
    calibrate: str = "minmax"
    exclude: tuple[str, ...] = ()  # ONNX node names to keep in fp32
    qat_epochs: int = 3
    qat_lr: float = 5e-4  # fine-tuning, not training: ~1/6 of train's default
    # 7-bit weights: "auto" turns them on where this CPU's int8 kernels saturate (no VNNI)
    reduce_range: str = "auto"
    seed: int = 0
    # static/qat: balance depthwise -> pointwise pairs first (equalize.py; outputs unchanged)
    equalize: bool = True
    # static/qat: the layer computing the output (logits) stays fp32. Its int8 error lands on
    # the logits with nothing after it to average it out: on a distilled Fashion-MNIST
    # student it cost 3.5 points alone, and 0.0 in fp32 (330 weights).
    keep_output_fp32: bool = True
    device: str = "cpu"  # where the qat fine-tune trains; the int8 model runs on the CPU
    amp: str = "off"

    def __post_init__(self) -> None:
        check_device(self.device)
        check_amp(self.amp)
        if self.mode not in MODES:
            raise TorchslimError(
                f"unknown quantize mode {self.mode!r}; choose one of {', '.join(MODES)}"
            )
        if self.backend != "auto" and self.backend not in BACKENDS[self.mode]:
            raise UsageError(
                f"--backend {self.backend} is not available for mode {self.mode}; use "
                f"{' or '.join(BACKENDS[self.mode])} (or auto)"
            )
        if self.calib_batches < 1 or self.calib_batch_size < 1:
            raise UsageError("--calib-batches and the calibration batch size must be >= 1")
        if self.calibrate not in CALIBRATIONS:
            raise UsageError(f"calibrate must be one of {', '.join(CALIBRATIONS)}")
        if self.qat_epochs < 1 or self.qat_lr <= 0:
            raise UsageError("qat_epochs must be >= 1 and qat_lr > 0")
        if self.reduce_range not in REDUCE_RANGE:
            raise UsageError(f"--reduce-range must be one of {', '.join(REDUCE_RANGE)}, got "
                             f"{self.reduce_range!r}")

    @property
    def use_reduce_range(self) -> bool:
        from .hw import int8_saturates

        return self.reduce_range == "on" or (self.reduce_range == "auto" and int8_saturates())

    @property
    def runtime(self) -> str:
        return BACKENDS[self.mode][0] if self.backend == "auto" else self.backend

    @property
    def suffix(self) -> str:
        return ".onnx" if self.runtime == "onnxruntime" else ".pt"


@dataclass
class QuantResult:
    path: Path
    mode: str
    runtime: str  # which runtime runs the artifact: "onnxruntime" | "torch"
    meta: ModelMeta
    fallbacks: list[str] = field(default_factory=list)  # compute layers left in fp32
    int8_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    fp32_onnx: Path | None = None  # the fp32 ONNX export, when kept (for same-runtime tables)


def quantize_model(
    model: LoadedModel | nn.Module,
    cfg: QuantizeConfig,
    *,
    out_path: str | Path,
    data=None,
    meta: ModelMeta | None = None,
    input_shape: tuple[int, ...] | None = None,
    force: bool = False,
    keep_fp32_onnx: str | Path | None = None,
    inputs: InputSpec | None = None,
) -> QuantResult:
    """Quantize ``model`` per ``cfg`` and write the artifact to ``out_path`` (atomically).

    ``data`` is a DataSplit: calibration (static), fine-tuning (qat) and accuracy before and
    after. ``keep_fp32_onnx`` also writes the fp32 export there (ORT modes) so callers can
    compare both precisions on the same runtime.
    """
    module, meta, sources, file_bytes = _resolve(model, meta)
    spec = resolve(inputs, input_shape, meta.input_spec(), data.inputs if data else None,
                   model=module)
    if spec is None:
        raise TorchslimError("input shape unknown; pass --input-shape C,H,W (or --input "
                             "SHAPE:DTYPE per input) or --data")
    out = Path(out_path)
    if out.suffix.lower() != cfg.suffix:
        raise UsageError(f"mode {cfg.mode} writes a {cfg.suffix} file; name -o like model"
                         f"{cfg.suffix}")
    check_output(out, force=force, inputs=sources)
    if cfg.mode in ("static", "qat") and data is None:
        raise TorchslimError(f"{cfg.mode} quantization needs --data to calibrate on "
                             "(e.g. --data digits, or the model's training images)")
    module = copy.deepcopy(module).float().eval()
    before = _before_stats(module, spec, data, file_bytes)
    meta = copy.deepcopy(meta)
    meta.set_input_spec(spec)
    if data is not None and not meta.class_names:
        meta.class_names = list(data.class_names)
    run = _quantize_onnx if cfg.runtime == "onnxruntime" else _quantize_torch
    res = run(module, cfg, spec, data, meta, before, out, force, sources, keep_fp32_onnx)
    res.accuracy_before = before.get("accuracy")
    return res


def _resolve(model, meta):
    if isinstance(model, LoadedModel):
        if model.model is None or model.kind == "torchscript":
            raise TorchslimError(
                f"`torchslim quantize` cannot transform a {model.kind} file ({model.path}); "
                "pass the eager model (torchslim .pt, pickle with --trust, or state_dict + --arch)"
            )
        return model.model, meta or model.meta, [model.path], model.file_bytes
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"expected an nn.Module to quantize, got {type(model).__name__}")
    return model, meta or ModelMeta(), [], None


def _before_stats(module, spec: InputSpec, data, file_bytes) -> dict:
    from .measure import count_macs, count_params

    stats = {"params": count_params(module)[0], "file_bytes": file_bytes}
    try:
        stats["macs"] = int(count_macs(module, spec.example(1)))
    except Exception as exc:  # a shape the model rejects: say so before any work is done
        raise TorchslimError(
            f"the model does not run on input {spec.describe()}: {oq.first_line(exc)}; "
            "pass the right --input-shape (or --input SHAPE:DTYPE per input)"
        ) from exc
    if data is not None:
        stats["accuracy"] = _evaluate(module, data)
    return stats


def _evaluate(fn, data) -> float:
    from .train import evaluate

    return float(evaluate(fn, data.val)[0])


# --- ONNX Runtime modes ---------------------------------------------------------------------


def _quantize_onnx(module, cfg, spec, data, meta, before, out, force, inputs, keep_fp32):
    with tempfile.TemporaryDirectory(prefix="torchslim-q-") as tmp:
        tmp = Path(tmp)
        notes: list[str] = []
        module, pairs = equalized(module, cfg, data.train) if data is not None else (module, [])
        if pairs:
            notes.append(f"equalized {len(pairs)} depthwise -> pointwise pair(s) for int8 "
                         "(same fp32 outputs, balanced ranges)")
        if cfg.mode == "qat":
            module, qat_note = _qat_finetune(module, cfg, data)
            notes.append(qat_note)
        fp32 = oq.export_onnx(module, spec, tmp / "fp32.onnx")
        src = _preprocessed(fp32, tmp, notes)
        q = tmp / "int8.onnx"
        kept: list[str] = []  # output layers kept in fp32 on purpose, not fallbacks
        reduce = cfg.use_reduce_range
        if reduce:
            notes.append("7-bit weights (reduce_range): this CPU has no VNNI, and full-range "
                         "int8 saturates its kernels")
        if cfg.mode == "dynamic":
            oq.quantize_dynamic_onnx(src, q, per_channel=False, exclude=cfg.exclude,
                                     reduce_range=reduce)
            notes.append("dynamic: int8 weights, activations quantized per call")
        else:
            calib = oq.calibration_batches(data.train, cfg.calib_batches, cfg.calib_batch_size,
                                           cfg.seed)
            exclude = cfg.exclude
            if cfg.keep_output_fp32:
                kept = [n for n in oq.output_layers(src) if n not in exclude]
                exclude = (*exclude, *kept)
                if kept:
                    notes.append(f"output layer {', '.join(kept)} kept in fp32 (its int8 "
                                 "error lands on the logits)")
            oq.quantize_static_onnx(src, q, calib, per_channel=cfg.per_channel,
                                    exclude=exclude, calibrate=cfg.calibrate,
                                    reduce_range=reduce)
            notes.append(f"calibrated on {sum(len(c[0]) for c in calib)} training samples "
                         f"({cfg.calibrate})")
        ops = oq.summarize_ops(oq.runtime_ops(q, tmp))
        fallbacks = [f for f in ops["fp32_compute"] if f.split(" ")[0] not in kept]
        if ops["fp32_elementwise"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(ops["fp32_elementwise"].items()))
            notes.append(f"fp32 elementwise ops: {kinds}")
        acc = _evaluate(oq.OnnxRunner(q), data) if data is not None else None
        after = {"params": before["params"], "macs": before["macs"], "accuracy": acc,
                 "runtime": "onnxruntime", "int8_ops": sum(ops["int8_ops"].values()),
                 "fp32_compute_ops": len(fallbacks)}
        if keep_fp32:  # the fp32 export with the source's own metadata, for comparisons
            final32 = oq.write_metadata(fp32, tmp / "fp32-meta.onnx", meta.to_dict(),
                                        macs=before["macs"])
            fp32_copy = atomic_write(Path(keep_fp32), lambda t: shutil.copyfile(final32, t),
                                     force=force, inputs=inputs)
        meta.history.append(_history(cfg, before, after, notes, fallbacks))
        _write_onnx(q, tmp, meta, out, force, inputs)
    return QuantResult(out, cfg.mode, "onnxruntime", meta, fallbacks, ops["int8_ops"], notes,
                       accuracy_after=acc, fp32_onnx=fp32_copy if keep_fp32 else None)


def _preprocessed(fp32: Path, tmp: Path, notes: list[str]) -> Path:
    try:
        return oq.preprocess(fp32, tmp / "pre.onnx")
    except Exception as exc:  # symbolic shape inference fails on some graphs: not fatal
        notes.append(f"ORT pre-processing skipped ({oq.first_line(exc)})")
        return fp32


def _history(cfg, before, after, notes, fallbacks) -> dict:
    extra = [f"fp32 fallback: {', '.join(fallbacks)}"] if fallbacks else []
    return history_entry("quantize", config_to_dict(cfg), before, after, [*notes, *extra])


def _write_onnx(q: Path, tmp: Path, meta: ModelMeta, out: Path, force, inputs) -> None:
    """Embed metadata; the recorded size is the final file's (the JSON holds its own size)."""
    final = tmp / "final.onnx"
    size = q.stat().st_size
    for _ in range(4):  # converges in two rounds: only the size's digits can change
        meta.history[-1]["after"]["file_bytes"] = size
        oq.write_metadata(q, final, meta.to_dict(), macs=meta.history[-1]["before"]["macs"])
        if final.stat().st_size == size:
            break
        size = final.stat().st_size
    atomic_write(out, lambda t: shutil.copyfile(final, t), force=force, inputs=inputs)


def equalized(module: nn.Module, cfg: QuantizeConfig, train) -> tuple[nn.Module, list[str]]:
    """The model static and QAT int8 start from: with ``cfg.equalize``, a copy with its
    depthwise -> pointwise pairs balanced on the calibration batches of ``train`` (same
    fp32 outputs); the pairs' names. The per-layer diagnosis uses it too."""
    if not cfg.equalize or cfg.mode not in ("static", "qat"):
        return module, []
    from .equalize import equalize

    calib = oq.calibration_batches(train, cfg.calib_batches, cfg.calib_batch_size, cfg.seed)
    inputs = tuple(torch.from_numpy(np.concatenate(a)) for a in zip(*calib, strict=True))
    return equalize(module, inputs)


def diagnose(module: nn.Module, cfg: QuantizeConfig, spec, train):
    """Per-layer int8 error of ``module`` quantized as ``cfg`` would quantize it (equalized,
    calibrated on ``train``, its output layer as cfg keeps it): qdiag.Diagnosis."""
    from . import qdiag

    module, _ = equalized(module, cfg, train)
    calib = oq.calibration_batches(train, cfg.calib_batches, cfg.calib_batch_size, cfg.seed)
    return qdiag.diagnose(module, spec, calib, per_channel=cfg.per_channel,
                          reduce_range=cfg.use_reduce_range, calibrate=cfg.calibrate,
                          keep_output_fp32=cfg.keep_output_fp32)


def _qat_finetune(module, cfg, data):
    """Fine-tune with int8 fake-quant on weights and layer inputs, then bake the weights.

    BatchNorm statistics stay frozen (momentum 0) and the start point counts as epoch 0, so
    a fine-tune that does not help keeps the starting weights instead of losing accuracy.
    """
    from .runtime import add_fake_quant, remove_fake_quant
    from .train import TrainConfig, fit

    handles = add_fake_quant(module, 64 if cfg.use_reduce_range else 127)
    with torch.no_grad():  # set the activation ranges from training data, not validation
        call(module.eval(), data.head(cfg.calib_batch_size * cfg.calib_batches))
    start_acc, start_state = _evaluate(module, data), copy.deepcopy(module.state_dict())
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    tcfg = TrainConfig(epochs=cfg.qat_epochs, lr=cfg.qat_lr, seed=cfg.seed, augment=False,
                       device=cfg.device, amp=cfg.amp)
    result = fit(module, data, tcfg)
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    note = (f"qat: {cfg.qat_epochs} epochs fake-quant fine-tune at lr {cfg.qat_lr}, "
            f"fake-quant val {start_acc:.2f}% -> {result.best_top1:.2f}%")
    if result.best_top1 < start_acc:
        module.load_state_dict(start_state)
        note += " (no gain: kept the starting weights)"
    remove_fake_quant(module, handles)
    return module.eval(), note


# --- torch modes ----------------------------------------------------------------------------


def _quantize_torch(module, cfg, spec, data, meta, before, out, force, inputs, keep_fp32):
    from .runtime import CastWrapper, int8_weight_only

    if cfg.mode == "weight-only":
        qmodel, kept = int8_weight_only(module)
        notes = ["int8 weights + per-channel fp32 scales; decoded to fp32 on first call"]
    else:
        dtype = torch.float16 if cfg.mode == "fp16" else torch.bfloat16
        compute = torch.float32 if cfg.mode == "fp16" else torch.bfloat16
        qmodel, kept = CastWrapper(module, dtype, compute), []
        notes = [f"{cfg.mode} weights, computed in {str(compute).removeprefix('torch.')}"]
    probe = copy.deepcopy(qmodel)  # running decodes in place; the file keeps the small form
    acc = _evaluate(probe, data) if data is not None else None
    after = {"params": before["params"], "macs": before["macs"], "accuracy": acc,
             "runtime": "torch"}
    meta.history.append(_history(cfg, before, after, notes, kept))
    save_model(qmodel, out, meta, force=force, inputs=inputs)
    after["file_bytes"] = out.stat().st_size
    return QuantResult(out, cfg.mode, "torch", meta, kept, {}, notes, accuracy_after=acc)


# --- comparison: same runtime and fastest fp32 ------------------------------------------------


def compare(
    fp32: LoadedModel | nn.Module,
    result: QuantResult,
    *,
    data=None,
    input_shape: tuple[int, ...] | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    min_run_time: float | None = None,
) -> list[dict]:
    """Measure fp32 torch eager, fp32 ONNX Runtime and the quantized artifact in one run.

    ``fp32`` is the source model (a LoadedModel also gives its file size).

    Each row (a Measurement dict) gains ``precision``, ``speedup_vs_fastest_fp32`` and
    ``speedup_vs_fp32_same_runtime``, so no speed-up is claimed against a slow baseline.
    """
    from .io import load_model
    from .measure import measure

    spec = resolve(input_shape, result.meta.input_spec())
    kw = {"inputs": spec, "data": data, "threads": threads, "batch_size": batch_size,
          "min_run_time": min_run_time}
    module = fp32.model if isinstance(fp32, LoadedModel) else fp32
    rows = [_row(measure(fp32, name="fp32 torch eager", **kw), "fp32")]
    with tempfile.TemporaryDirectory(prefix="torchslim-cmp-") as tmp:
        fp32_onnx = result.fp32_onnx or _export_fp32(module, spec, result, Path(tmp))
        rows.append(_row(measure(load_model(fp32_onnx), name="fp32 onnxruntime", **kw), "fp32"))
    quant = measure(load_model(result.path), name=f"{result.mode} {result.path.name}", **kw)
    rows.append(_row(quant, result.mode))
    rate_speedups(rows)
    return rows


def rate_speedups(rows: list[dict], baseline: list[dict] | None = None) -> None:
    """Give each row its speed-up over the fastest fp32 row of any runtime and over fp32 on
    its own runtime (rows carry ``precision``, ``runtime`` and ``latency_ms_median``).

    The fp32 rows are taken from ``baseline`` (default: ``rows``), e.g. the first model of a
    report in every runtime it ran in; a ratio with no fp32 row to stand on is None.
    """
    fp32 = [r for r in (rows if baseline is None else baseline)
            if r.get("precision") == "fp32" and r.get("latency_ms_median")]
    fastest = min((r["latency_ms_median"] for r in fp32), default=None)
    for r in rows:
        same = next((x for x in fp32 if x["runtime"] == r["runtime"]), None)
        ms = r.get("latency_ms_median")
        r["speedup_vs_fastest_fp32"] = fastest / ms if fastest and ms else None
        r["speedup_vs_fp32_same_runtime"] = same["latency_ms_median"] / ms if same and ms \
            else None


def _row(m, precision: str) -> dict:
    d = m.to_dict()
    d["precision"] = precision
    return d


def _export_fp32(module: nn.Module, spec, result: QuantResult, tmp: Path) -> Path:
    """fp32 ONNX of the source, with its MACs recorded so report can show them."""
    raw = oq.export_onnx(copy.deepcopy(module).float(), spec, tmp / "raw.onnx")
    macs = result.meta.history[-1]["before"].get("macs") if result.meta.history else None
    return oq.write_metadata(raw, tmp / "fp32.onnx", {}, macs=macs)
