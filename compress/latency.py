"""Latency statistics at the standard of the field's benchmark tools, and the process's peak
memory while a model runs.

Every call is timed on its own (``time.perf_counter`` around each call, ~0.1 us of overhead),
so the percentiles are percentiles of calls, as in onnxruntime_perf_test or OpenVINO's
benchmark_app, not of block averages. Like ``timeit``, the garbage collector is off while
timing: a collection in the middle of a call is Python's cost, not the model's.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Seconds of timing per batch size: enough for a stable median on a busy 2-core box.
DEFAULT_MIN_RUN_TIME = 0.5
WARMUP_CALLS = 3
# At least this many timed calls, however slow the model: fewer make the percentiles noise.
MIN_RUNS = 10
# Coefficient of variation (std / mean of the timed calls) above which the figures are
# flagged. A CPU kernel's own call-to-call jitter is a few percent; what pushes the CV past
# 15 % is calls descheduled by other processes: on this project's shared 2-core box under
# load, CVs of 20-90 % were measured, with the mean 2-5x the median.
CV_WARN = 0.15


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    runs: int  # timed calls
    p95_ms: float | None = None
    p99_ms: float | None = None
    min_ms: float | None = None
    mean_ms: float | None = None
    cv: float | None = None  # coefficient of variation: std / mean of the timed calls
    seconds: float | None = None  # wall time of the timed calls together


def summarize(times_s: Sequence[float]) -> LatencyStats:
    """Statistics of per-call wall times in seconds."""
    if len(times_s) == 0:
        raise ValueError("no timed calls to summarize")
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    p90, p95, p99 = (float(v) for v in np.percentile(ms, [90, 95, 99]))
    return LatencyStats(
        median_ms=float(np.median(ms)), p90_ms=p90, runs=len(ms), p95_ms=p95, p99_ms=p99,
        min_ms=float(ms.min()), mean_ms=mean, cv=float(ms.std() / mean) if mean > 0 else 0.0,
        seconds=float(ms.sum() / 1e3))


def stats_fields(prefix: str, stats: LatencyStats | None) -> dict[str, float | int | None]:
    """The Measurement fields beyond median and p90 for ``prefix`` (latency, batch_latency)."""
    keys = ("p95_ms", "p99_ms", "min_ms", "mean_ms", "cv", "runs", "seconds")
    out = {}
    for key in keys:
        name = f"{prefix}_ms_{key[:-3]}" if key.endswith("_ms") else f"{prefix}_{key}"
        out[name] = None if stats is None else getattr(stats, key)
    return out


def throughput(stats: LatencyStats | None, batch: int) -> float | None:
    """Items per second: every item of every timed call over the calls' total wall time."""
    if stats is None or not stats.seconds:
        return None
    return batch * stats.runs / stats.seconds


def noise_warning(timings: dict[str, LatencyStats | None],
                  threshold: float = CV_WARN) -> str | None:
    """One warning for timings (label -> stats) whose calls varied too much, else None."""
    noisy = [f"{label} {s.cv:.0%}" for label, s in timings.items()
             if s is not None and s.cv is not None and s.cv > threshold]
    if not noisy:
        return None
    return (f"machine busy: numbers noisy (call-to-call variation {', '.join(noisy)}, over "
            f"{threshold:.0%}); use --threads 1 or --min-time")


def time_calls(fn: Callable, example_input, *, min_run_time: float,
               min_runs: int = MIN_RUNS) -> list[float]:
    """Seconds of each call of ``fn(example_input)``: at least ``min_runs`` calls and
    ``min_run_time`` seconds. The caller warms up and sets threads."""
    times: list[float] = []
    clock = time.perf_counter
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        while len(times) < min_runs or clock() - start < min_run_time:
            t0 = clock()
            fn(example_input)
            times.append(clock() - t0)
    finally:
        if gc_was_on:
            gc.enable()
    return times


def measure_latency(fn: Callable, example_input, *, threads: int,
                    min_run_time: float = DEFAULT_MIN_RUN_TIME) -> LatencyStats:
    """Per-call latency statistics of ``fn(example_input)`` in ms, after a warm-up.

    Torch's intra-op thread count is set to ``threads`` and restored afterwards. Any callable
    works, so onnxruntime sessions get the very same statistics.
    """
    with torch_threads(threads), torch.inference_mode():
        start = time.perf_counter()
        for _ in range(WARMUP_CALLS):  # first calls allocate and pick kernels
            fn(example_input)
            if time.perf_counter() - start > min_run_time / 2:
                break  # a slow model is warm after one call; keep report quick
        return summarize(time_calls(fn, example_input, min_run_time=min_run_time))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak resident memory of this process in a block, minus what it held on entry.

    Linux keeps the process's peak RSS (VmHWM); writing 5 to /proc/self/clear_refs resets
    it to the current RSS (Linux >= 4.0), so the peak after the block is the peak inside it.
    Elsewhere ``delta_bytes`` stays None and ``reason`` says why.
    """

    def __init__(self) -> None:
        self.delta_bytes: int | None = None
        self.reason: str | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            self._start = _status_kb("VmRSS")
            _CLEAR_REFS.write_text("5")
        except (OSError, ValueError) as exc:
            self._start = None
            self.reason = f"peak memory not measured: {type(exc).__name__}: {exc}"[:200]
        return self

    def __exit__(self, *exc_info) -> None:
        if self._start is not None:
            try:
                self.delta_bytes = max(0, _status_kb("VmHWM") - self._start) * 1024
            except (OSError, ValueError) as exc:
                self.reason = f"peak memory not measured: {exc}"[:200]


def _status_kb(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"{key} not in {_STATUS}")
