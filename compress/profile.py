"""Per-layer profile: where a model's batch-1 time goes, layer by layer, beside each layer's
params, MACs and bytes. The answer to "I pruned/quantized it: why is it not faster?".

Torch models: every leaf module's calls are timed with forward hooks and ``perf_counter_ns``
(the pre-hook reads the clock last, the post-hook first, so a layer's time is its forward and
nothing of the hooks). torch.profiler was measured first and dropped: recording every aten op
inflated the forward by 20 % on PDModel and 4x on resnet_tiny (busy 2-core box, same run),
while the hooks' own cost falls between layers, outside every layer's interval. ONNX files:
ONNX Runtime's own profiler (profile_onnx.py), one row per node of the graph ORT really runs;
a node's time is its kernel's, the profiler's bookkeeping falls between nodes.

How the layers are made to add up to a typical run: every profiled run is one forward; the
runs whose total lies in the middle fifth (40th to 60th percentile, around the median) are
kept and each layer's time is its mean over them, so the layers add up to a median run (a
wider window let preempted runs in on a busy box: layers 4x the median on resnet_tiny).
Shares are of the whole-model median measured without hooks or profiler; what runs outside
every layer (container code, residual adds written in a forward, Python, the runtime's own
overhead) is one row, the median minus the layers. The layers' own sum is the figure to
check against the median (``total_ms``; ``coverage`` = their ratio).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import TorchslimError
from .inputs import resolve
from .latency import torch_threads
from .measure import EXTRA_FLOP_FORMULAS, QUANT_STORAGE, _eval_mode, _example, _open

# Profiled runs: at least this many, at most this many, and about min_run_time seconds.
MIN_PROFILED_RUNS = 10
MAX_PROFILED_RUNS = 2000
CENTRAL = (40, 60)  # percentiles of the run totals whose runs the layer times come from


def profile_layers(target, *, inputs, threads: int, min_run_time: float = 0.5,
                   whole_ms: float | None = None) -> dict[str, Any]:
    """Per-layer rows of ``target`` (nn.Module, or a LoadedModel; ONNX runs in ORT) at batch
    1 on generated ``inputs`` (an InputSpec or a (C, H, W) shape), sorted by time.
    ``whole_ms`` is the whole model's median (default: the profiled runs' mean).

    Returns ``{"tool", "runs", "rows", "total_ms", "whole_model_median_ms", "coverage",
    "macs_total", "notes"}`` (ONNX adds ``by_precision``, ``fp32_compute``, ``qdq_ms``); a
    row has name, type, params, macs, bytes, ms, share (% of the whole), precision, calls.
    """
    subject, _, _ = _open(target, threads)
    spec = resolve(inputs, model=getattr(subject, "model", None))
    example = _example(spec, 1, subject.dtype)
    if subject.runtime == "onnxruntime":
        from .profile_onnx import profile_onnx

        out = profile_onnx(subject.files[0], subject.prepare(example), threads=threads,
                           min_run_time=min_run_time)
    elif subject.runtime == "torch":
        out = profile_torch(subject.model, example, threads=threads, min_run_time=min_run_time)
    else:
        raise TorchslimError(f"--layers needs an eager PyTorch model or an ONNX file; "
                             f"{subject.default_name} is {subject.runtime}, whose layers "
                             "forward hooks cannot see")
    return finish(out, whole_ms)


def finish(out: dict[str, Any], whole_ms: float | None) -> dict[str, Any]:
    """Add the outside-the-layers row, each row's share of the whole, sort by time."""
    whole = whole_ms or out["profiled_run_ms"]
    measured = sum(r["ms"] for r in out["rows"] if r["ms"] is not None)
    outside = {"name": out["outside_name"], "type": "", "params": 0, "macs": 0, "bytes": 0,
               "ms": max(0.0, whole - measured), "precision": None, "calls": None}
    rows = sorted([*out["rows"], outside],
                  key=lambda r: (r["ms"] is None, -(r["ms"] or 0.0)))
    for r in rows:
        r["share"] = None if r["ms"] is None or not whole else 100.0 * r["ms"] / whole
    counted = [r["macs"] for r in rows if r["macs"] is not None]
    extra = {k: v for k, v in out.items() if k not in ("rows", "outside_name")}
    return {**extra, "rows": rows, "total_ms": measured, "whole_model_median_ms": whole_ms,
            "coverage": measured / whole if whole else None, "macs_total": sum(counted)}


def _central(totals: Sequence[float]) -> np.ndarray:
    """Which runs have a total between the CENTRAL percentiles (all, if none do)."""
    totals = np.asarray(totals, dtype=np.float64)
    lo, hi = np.percentile(totals, CENTRAL)
    keep = (totals >= lo) & (totals <= hi)
    return keep if keep.any() else np.ones(len(totals), dtype=bool)


def central_mean(per_run: list[dict[str, float]], totals: Sequence[float]) -> dict[str, float]:
    """Each key's mean over the runs around the median total (see CENTRAL)."""
    keep = [run for run, k in zip(per_run, _central(totals), strict=True) if k]
    keys = {k for run in keep for k in run}
    return {k: sum(run.get(k, 0.0) for run in keep) / len(keep) for k in keys}


def central_total(totals: Sequence[float]) -> float:
    """The mean total of the same runs: what ``central_mean``'s rows add up to."""
    return float(np.asarray(totals, dtype=np.float64)[_central(totals)].mean())


# ---------------------------------------------------------------------------- torch


class _Calls:
    """Forward hooks on every module that keep a stack of the calls in flight, so each call's
    cost can be split into its own and its callees' (``enter``/``leave`` are overridden)."""

    def __init__(self, model: nn.Module) -> None:
        self.names: dict[nn.Module, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(m, name)
        self.handles: list = []
        self.model = model

    def __enter__(self) -> _Calls:
        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, module, args) -> None:
        self.enter(self.names[module])

    def _post(self, module, args, output) -> None:
        self.leave(self.names[module])

    def enter(self, name: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def leave(self, name: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _MacCalls(_Calls):
    """Self MACs of every module: FLOPs counted while its call is open, minus its callees'."""

    def __init__(self, model: nn.Module, counter) -> None:
        super().__init__(model)
        self.counter = counter
        self.stack: list[list] = []  # [name, flops at entry, callees' flops]
        self.self_macs: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def enter(self, name: str) -> None:
        self.stack.append([name, self.counter.get_total_flops(), 0])

    def leave(self, name: str) -> None:
        _, start, callees = self.stack.pop()
        inclusive = self.counter.get_total_flops() - start
        self.self_macs[name] += (inclusive - callees) // 2
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += inclusive


class _TimedCalls(_Calls):
    """Wall time of every leaf module's calls, per run (a call of the root delimits a run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.leaves = {n for m, n in self.names.items() if next(m.children(), None) is None}
        self.clock: list[int] = []
        self.runs: list[dict[str, float]] = []
        self.totals: list[float] = []

    def enter(self, name: str) -> None:
        if name == "":
            self.runs.append(defaultdict(float))
        self.clock.append(time.perf_counter_ns())  # last: nothing of the hook is timed

    def leave(self, name: str) -> None:
        end = time.perf_counter_ns()  # first
        ms = (end - self.clock.pop()) / 1e6
        if name in self.leaves:
            self.runs[-1][name] += ms
        if name == "":
            self.totals.append(ms)


def profile_torch(model: nn.Module, example: tuple[torch.Tensor, ...], *, threads: int,
                  min_run_time: float) -> dict[str, Any]:
    """A timed row per leaf module; a container with its own params or MACs (ops written in
    its forward) gets an untimed "own ops" row, so the MACs column adds up exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    with _eval_mode(model), torch_threads(threads), torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        macs = _MacCalls(model, counter)
        with counter, macs:
            model(*example)
        model(*example)  # warm again without the counter
        timed = _TimedCalls(model)
        with timed:
            start = time.perf_counter()
            while len(timed.totals) < MAX_PROFILED_RUNS and (
                    len(timed.totals) < MIN_PROFILED_RUNS
                    or time.perf_counter() - start < min_run_time):
                model(*example)
    ms = central_mean(timed.runs, timed.totals)
    rows = []
    for module, name in macs.names.items():
        params, nbytes = _own_weights(module)
        leaf = name in timed.leaves
        if not (leaf or params or macs.self_macs.get(name)):
            continue
        label = name or type(module).__name__
        rows.append({"name": label if leaf else f"{label} (own ops)",
                     "type": type(module).__name__, "params": params,
                     "macs": macs.self_macs.get(name, 0), "bytes": nbytes,
                     "ms": ms.get(name, 0.0) if leaf else None, "precision": None,
                     "calls": macs.calls.get(name, 0)})
    return {"tool": "forward hooks (perf_counter)", "runs": len(timed.totals), "rows": rows,
            "notes": [], "profiled_run_ms": central_total(timed.totals),
            "outside_name": "(outside leaf layers: container code, Python)"}


def _own_weights(module: nn.Module) -> tuple[int, int]:
    """(parameters, bytes as stored) of a module's own tensors; int8 weight buffers count."""
    tensors = [p for p in module.parameters(recurse=False)]
    tensors += [b for b in module.buffers(recurse=False) if b.dtype in QUANT_STORAGE]
    params = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size()
                 for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
    return params, nbytes
