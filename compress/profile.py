"""Per-layer profile: where a model's batch-1 time goes, layer by layer, beside each layer's
params, MACs and bytes. The answer to "I pruned/quantized it: why is it not faster?".

Torch models are timed with ``torch.profiler``: a ``record_function`` range around every
module call (forward hooks), so a layer's time is its own range minus the ranges of the
modules it calls (its "self" time), and the layers add up to the whole forward. ONNX files are
timed with ONNX Runtime's own profiler (profile_onnx.py), one row per node of the graph ORT
really runs (after its fusions).

How the layer times are made to add up to a typical run: each profiled run is one forward;
the runs whose total lies in the middle half (25th to 75th percentile) are kept, and every
layer's time is its mean over those runs. The layers' sum is then the mean of those runs,
which sits next to the unprofiled median; what the profiler itself costs shows as the gap
(``total_ms`` against ``whole_model_median_ms``), never spread over the layers.
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
from .latency import torch_threads
from .measure import EXTRA_FLOP_FORMULAS, QUANT_STORAGE, _eval_mode, _example, _open

# Profiled runs: at least this many, and at most this many (torch.profiler's event list costs
# ~30 ms of Python per run of a small CNN to read back).
MIN_PROFILED_RUNS = 10
MAX_TORCH_RUNS = 100
RANGE_PREFIX = "torchslim.layer::"


def profile_layers(target, *, input_shape: Sequence[int], threads: int,
                   min_run_time: float = 0.5) -> dict[str, Any]:
    """Per-layer rows of ``target`` (nn.Module, or a LoadedModel; ONNX runs in ORT), sorted
    by time. Returns ``{"tool", "runs", "total_ms", "rows": [...], "notes": [...]}`` (ONNX adds
    ``by_precision`` and ``fp32_compute``); each row has name, type, params, macs, bytes, ms,
    share (% of total_ms), precision and calls."""
    subject, _, _ = _open(target, threads)
    shape = tuple(int(d) for d in input_shape)
    if subject.runtime == "onnxruntime":
        from .profile_onnx import profile_onnx

        out = profile_onnx(subject.files[0], shape, threads=threads, min_run_time=min_run_time)
    elif subject.runtime == "torch":
        out = profile_torch(subject.model, _example(shape, 1, subject.dtype), threads=threads,
                            min_run_time=min_run_time)
    else:
        raise TorchslimError(f"--layers needs an eager PyTorch model or an ONNX file; "
                             f"{subject.default_name} is {subject.runtime}, whose layers "
                             "forward hooks cannot see")
    return finish(out)


def finish(out: dict[str, Any]) -> dict[str, Any]:
    """Sort rows by time, add each row's share of the total, and the MACs total."""
    rows = sorted(out["rows"], key=lambda r: r["ms"], reverse=True)
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = 100.0 * r["ms"] / total if total > 0 else 0.0
    counted = [r["macs"] for r in rows if r["macs"] is not None]
    return {**out, "rows": rows, "total_ms": total, "macs_total": sum(counted)}


def central_mean(per_run: list[dict[str, float]], totals: Sequence[float]) -> dict[str, float]:
    """Each key's mean over the runs whose total lies between the 25th and 75th percentile."""
    totals = np.asarray(totals, dtype=np.float64)
    lo, hi = np.percentile(totals, [25, 75])
    keep = [run for run, t in zip(per_run, totals, strict=True) if lo <= t <= hi] or per_run
    keys = {k for run in keep for k in run}
    return {k: sum(run.get(k, 0.0) for run in keep) / len(keep) for k in keys}


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


class _RangeCalls(_Calls):
    """A ``torch.profiler`` range around every module call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.open: list = []

    def enter(self, name: str) -> None:
        rf = torch.autograd.profiler.record_function(RANGE_PREFIX + name)
        rf.__enter__()
        self.open.append(rf)

    def leave(self, name: str) -> None:
        self.open.pop().__exit__(None, None, None)


def profile_torch(model: nn.Module, example: torch.Tensor, *, threads: int,
                  min_run_time: float) -> dict[str, Any]:
    """Rows for every module with its own params, MACs or time; the root module's own row
    holds what runs outside any submodule (and the hooks' Python)."""
    from torch.utils.flop_counter import FlopCounterMode

    with _eval_mode(model), torch_threads(threads), torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        macs = _MacCalls(model, counter)
        with counter, macs:
            model(example)
        runs = _runs_for(model, example, min_run_time, MAX_TORCH_RUNS)
        per_run, totals = _profiled_runs(model, example, runs)
    ms = central_mean(per_run, totals)
    rows = []
    for module, name in macs.names.items():
        params, nbytes = _own_weights(module)
        if not (params or macs.self_macs.get(name) or ms.get(name)):
            continue
        leaf = not any(True for _ in module.children())
        label = name or f"({type(module).__name__}: outside submodules)"
        rows.append({"name": label if leaf or not name else f"{name} (own ops)",
                     "type": type(module).__name__, "params": params,
                     "macs": macs.self_macs.get(name, 0), "bytes": nbytes,
                     "ms": ms.get(name, 0.0), "precision": None,
                     "calls": macs.calls.get(name, 0)})
    return {"tool": "torch.profiler", "runs": len(per_run), "rows": rows, "notes": []}


def _runs_for(model, example, min_run_time: float, cap: int) -> int:
    """As many runs as fit in ``min_run_time`` unprofiled (warm), within the bounds."""
    model(example)
    start = time.perf_counter()
    model(example)
    one = max(time.perf_counter() - start, 1e-6)
    return int(min(cap, max(MIN_PROFILED_RUNS, min_run_time / one)))


def _profiled_runs(model, example, runs: int) -> tuple[list[dict[str, float]], list[float]]:
    """Per run: each module's self time in ms; and each run's total (the root's range)."""
    from torch.profiler import ProfilerActivity, profile

    with _RangeCalls(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            model(example)
    ranges = sorted(
        ((e.time_range.start, e.time_range.end, e.name[len(RANGE_PREFIX):])
         for e in prof.events() if e.name.startswith(RANGE_PREFIX)),
        key=lambda t: (t[0], -t[1]))
    root = ""
    per_run: list[dict[str, float]] = []
    totals: list[float] = []
    stack: list[list] = []  # [end, name, callees' us, own us]: the ranges still open
    for start, end, name in ranges:
        while stack and stack[-1][0] <= start:
            _close(stack, per_run)
        if name == root and not stack:
            per_run.append(defaultdict(float))
            totals.append((end - start) / 1e3)
        if stack:
            stack[-1][2] += end - start
        stack.append([end, name, 0.0, end - start])
    while stack:
        _close(stack, per_run)
    return per_run, totals


def _close(stack: list[list], per_run: list[dict[str, float]]) -> None:
    _, name, callees, dur = stack.pop()
    if per_run:
        per_run[-1][name] += (dur - callees) / 1e3


def _own_weights(module: nn.Module) -> tuple[int, int]:
    """(parameters, bytes as stored) of a module's own tensors; int8 weight buffers count."""
    tensors = [p for p in module.parameters(recurse=False)]
    tensors += [b for b in module.buffers(recurse=False) if b.dtype in QUANT_STORAGE]
    params = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size()
                 for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
    return params, nbytes
