"""`report` as a benchmark: statistics, same-runtime baselines, per-layer profile, agreement."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress import hw, latency
from torchslim.compress.agreement import agreement
from torchslim.compress.baselines import cache_dir, measure_runtimes
from torchslim.compress.io import load_model, save_model
from torchslim.compress.measure import measure
from torchslim.compress.profile import profile_layers
from torchslim.compress.quantize import QuantizeConfig, quantize_model, rate_speedups

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.05"]
STATS_KEYS = {"precision", "cold_ms", "latency_ms_p95", "latency_ms_p99", "latency_ms_min",
              "latency_ms_mean", "latency_cv", "latency_runs", "latency_seconds",
              "batch_latency_ms_p95", "batch_latency_ms_p99", "batch_latency_ms_min",
              "batch_latency_ms_mean", "batch_latency_cv", "batch_latency_runs",
              "batch_latency_seconds", "throughput_per_s", "peak_rss_delta_bytes", "warnings"}
OLD_KEYS = {"model", "params", "nonzero_params", "file_bytes", "macs", "latency_ms_median",
            "latency_ms_p90", "batch_size", "threads", "accuracy", "top5"}


def _report(*args):
    res = runner.invoke(app, ["report", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def tiny_int8(trained_tiny, digits, tmp_path_factory):
    """The tiny model quantized static int8 (ONNX Runtime QDQ), calibrated on 64 images."""
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    quantize_model(load_model(trained_tiny), QuantizeConfig(calib_batches=2), out_path=out,
                   data=digits)
    return out


@pytest.fixture(scope="module")
def tiny_pruned(trained_tiny, tmp_path_factory):
    """Half the channels of the tiny model pruned away (no fine-tuning): same layer names."""
    from torchslim.compress.prune import PruneConfig, prune_model

    loaded = load_model(trained_tiny)
    model, _ = prune_model(loaded.model, PruneConfig(ratio=0.5), torch.zeros(1, 1, 8, 8))
    return save_model(model, tmp_path_factory.mktemp("pruned") / "pruned.pt", loaded.meta)


# --------------------------------------------------------------------- statistics


def test_statistics_of_injected_timings_match_numpy():
    times = [0.001 * (1 + i % 7) for i in range(200)]  # seconds
    s = latency.summarize(times)
    ms = np.asarray(times) * 1e3
    assert s.median_ms == pytest.approx(np.median(ms))
    assert (s.p90_ms, s.p95_ms, s.p99_ms) == pytest.approx(tuple(np.percentile(ms, [90, 95, 99])))
    assert s.min_ms == pytest.approx(1.0) and s.mean_ms == pytest.approx(ms.mean())
    assert s.cv == pytest.approx(ms.std() / ms.mean())
    assert s.runs == 200 and s.seconds == pytest.approx(sum(times))
    assert latency.throughput(s, 32) == pytest.approx(32 * 200 / sum(times))


def test_noise_warning_only_above_the_threshold():
    steady = latency.summarize([0.001, 0.00101, 0.00099] * 20)
    noisy = latency.summarize([0.001] * 50 + [0.004] * 10)  # CV ~ 0.75
    assert latency.noise_warning({"batch 1": steady}) is None
    text = latency.noise_warning({"batch 1": steady, "batch 32": noisy})
    assert text.startswith("machine busy: numbers noisy")
    assert "batch 32 75%" in text and "batch 1 " not in text
    assert "use --threads 1 or --min-time" in text


def test_time_calls_runs_at_least_min_runs_and_min_time():
    calls = []
    times = latency.time_calls(calls.append, 1, min_run_time=0.0, min_runs=12)
    assert len(times) == len(calls) == 12
    start = time.perf_counter()
    times = latency.time_calls(lambda x: None, 1, min_run_time=0.05)
    assert time.perf_counter() - start >= 0.05 and len(times) > 100


def test_peak_memory_sees_an_allocation_inside_the_block():
    with latency.PeakMemory() as mem:
        block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
        del block
    if mem.reason:  # not Linux, or /proc/self/clear_refs not writable
        pytest.skip(mem.reason)
    assert mem.delta_bytes >= 60 << 20
    with latency.PeakMemory() as quiet:
        pass
    assert quiet.delta_bytes < 16 << 20


def test_environment_names_the_int8_instruction_sets():
    env = hw.environment(2)
    flags = hw.cpu_flags()
    assert env["avx2"] == ("avx2" in flags) and env["avx512"] == ("avx512f" in flags)
    assert env["vnni"] == hw.has_vnni() and isinstance(env["amx"], bool)
    assert env["isa"] == hw.isa() and env["threads"] == 2


def test_measure_record_has_full_statistics(trained_tiny):
    rec = measure(load_model(trained_tiny), threads=1, batch_size=4, min_run_time=0.05)
    d = rec.to_dict()
    assert OLD_KEYS | STATS_KEYS <= set(d)
    assert rec.precision == "fp32" and rec.cold_ms > 0
    assert rec.latency_ms_min <= rec.latency_ms_median <= rec.latency_ms_p90 \
        <= rec.latency_ms_p95 <= rec.latency_ms_p99
    assert rec.latency_runs >= latency.MIN_RUNS and rec.latency_seconds > 0
    assert rec.batch_latency_ms_min <= rec.batch_latency_ms_median <= rec.batch_latency_ms_p99
    assert rec.throughput_per_s == pytest.approx(
        4 * rec.batch_latency_runs / rec.batch_latency_seconds)
    assert rec.latency_cv >= 0
    if not any("peak memory" in n for n in rec.notes):
        assert rec.peak_rss_delta_bytes >= 0


def test_cv_warning_reaches_the_report(trained_tiny, monkeypatch):
    """Timings injected with a 4x outlier in every sixth call: the warning without a busy box."""
    def jittery(fn, x, *, min_run_time, min_runs=latency.MIN_RUNS):
        fn(x)
        return [0.001] * 50 + [0.004] * 10

    monkeypatch.setattr(latency, "time_calls", jittery)
    res = _report(trained_tiny, "-f", "json", *FAST)
    (row,) = json.loads(res.stdout)
    assert row["latency_cv"] == pytest.approx(0.745, abs=0.01)
    assert row["warnings"] and "machine busy" in row["warnings"][0]
    assert "machine busy: numbers noisy" in res.stderr


def test_precision_of_each_kind(trained_tiny, tiny_int8, tmp_path):
    from torchslim.compress.runtime import CastWrapper, int8_weight_only

    model = load_model(trained_tiny).model
    kw = {"input_shape": (1, 8, 8), "threads": 1, "min_run_time": 0.01, "batch_size": 2}
    assert measure(load_model(tiny_int8), **kw).precision == "int8"
    assert measure(CastWrapper(model, torch.float16, torch.float32), **kw).precision == "fp16"
    assert measure(int8_weight_only(model)[0], **kw).precision == "int8-weights"


# --------------------------------------------------------------------- baselines


def test_rate_speedups_against_the_first_models_runtimes():
    rows = [{"model": "a", "precision": "fp32", "runtime": "torch", "latency_ms_median": 4.0},
            {"model": "a", "precision": "fp32", "runtime": "onnxruntime",
             "latency_ms_median": 2.0},
            {"model": "b", "precision": "fp32", "runtime": "torch", "latency_ms_median": 1.0},
            {"model": "q", "precision": "int8", "runtime": "onnxruntime",
             "latency_ms_median": 0.5},
            {"model": "h", "precision": "fp16", "runtime": "tvm", "latency_ms_median": 1.0}]
    rate_speedups(rows, baseline=rows[:2])
    assert [r["speedup_vs_fastest_fp32"] for r in rows] == [0.5, 1.0, 2.0, 4.0, 2.0]
    assert [r["speedup_vs_fp32_same_runtime"] for r in rows] == [1.0, 1.0, 4.0, 4.0, None]


def test_runtime_all_measures_the_pt_in_both_runtimes(trained_tiny, tiny_int8):
    res = _report(trained_tiny, tiny_int8, "--runtime", "all", "--data", "digits", "-f", "json",
                  *FAST)
    rows = json.loads(res.stdout)
    assert [(r["model"], r["runtime"], r["precision"]) for r in rows] == [
        (str(trained_tiny), "torch", "fp32"), (str(trained_tiny), "onnxruntime", "fp32"),
        (str(tiny_int8), "onnxruntime", "int8")]
    pt, ort, q = rows
    assert ort["macs"] == pt["macs"]  # the same model, exported
    assert ort["params"] == pytest.approx(pt["params"], rel=0.02)  # BatchNorm folded on export
    assert ort["accuracy"] == pytest.approx(pt["accuracy"], abs=0.3)  # one image of 359
    fastest = min(pt["latency_ms_median"], ort["latency_ms_median"])
    for r in rows:
        assert r["speedup"] == pytest.approx(pt["latency_ms_median"] / r["latency_ms_median"])
        assert r["speedup_vs_fastest_fp32"] == pytest.approx(fastest / r["latency_ms_median"])
    assert q["speedup_vs_fp32_same_runtime"] == pytest.approx(
        ort["latency_ms_median"] / q["latency_ms_median"])
    assert any("fp32 ONNX export" in n for n in ort["notes"])
    cached = list((cache_dir() / "onnx").glob("tiny-*.onnx"))
    assert len(cached) == 1
    again = measure_runtimes(load_model(trained_tiny), "onnxruntime", min_run_time=0.01,
                             threads=1)
    assert list((cache_dir() / "onnx").glob("tiny-*.onnx")) == cached  # reused, not re-made
    assert again[0].runtime == "onnxruntime" and again[0].macs == pt["macs"]


def test_tables_say_which_baseline_each_speedup_is_against(trained_tiny, tiny_int8):
    res = _report(trained_tiny, tiny_int8, "--runtime", "all", "-f", "markdown", *FAST)
    header = res.stdout.splitlines()[0]
    assert "x faster vs fp32 torch" in header
    assert "x faster vs fastest fp32 (" in header and "x faster vs fp32 same runtime" in header
    assert "x faster: batch-1 median latency against row 1" in res.stdout
    assert "the fastest fp32 runtime measured here" in res.stdout
    table = _report(trained_tiny, tiny_int8, "--runtime", "all", *FAST).stdout
    assert "vs fastest fp32: against" in table and "latency statistics" in table
    assert "p99" in table and "cold ms" in table and "items/s bN" in table


def test_runtime_onnxruntime_alone_and_bad_runtime(trained_tiny):
    res = _report(trained_tiny, "--runtime", "onnxruntime", "-f", "json", *FAST)
    (row,) = json.loads(res.stdout)
    assert row["runtime"] == "onnxruntime" and row["model"] == str(trained_tiny)
    bad = runner.invoke(app, ["report", str(trained_tiny), "--runtime", "tvm"])
    assert bad.exit_code == 2 and "--runtime must be one of torch, onnxruntime, all" in bad.stderr


def test_demo_story_has_both_speedups():
    from torchslim.cli.demo import story_rows

    def row(model, runtime, ms, precision="fp32"):
        return {"model": model, "runtime": runtime, "latency_ms_median": ms, "file_bytes": 100,
                "accuracy": 90.0, "precision": precision}

    rows = [row("base", "torch", 4.0), row("base", "onnxruntime", 2.0),
            row("PDLightModel alone", "torch", 2.0), row("q", "onnxruntime", 0.5, "int8")]
    story = story_rows(rows)
    assert (story[1]["speedup"], story[1]["speedup_vs_fastest_fp32"]) == (2.0, 1.0)
    assert (story[2]["speedup"], story[2]["speedup_vs_fastest_fp32"]) == (8.0, 4.0)


# --------------------------------------------------------------------- agreement with
# independent timing loops. A loose bound here, on medians of single calls: on a busy box a
# call is now and then descheduled for a whole time slice, and the block means of
# blocked_autorange then sit far above any per-call median (measured: 2 ms against 0.4 ms).
# examples/bench_report_timing.py is the real check (15 %), on a quiet machine.


def test_median_agrees_with_torch_benchmark_and_an_ort_loop(trained_tiny, tiny_int8):
    from torch.utils import benchmark

    from torchslim.compress.measure_onnx import OnnxSubject

    loaded = load_model(trained_tiny)
    x = torch.randn(1, 1, 8, 8)
    timer = benchmark.Timer("m(x)", globals={"m": loaded.model.eval(), "x": x}, num_threads=1)
    subject = OnnxSubject(tiny_int8, 1)
    feed = subject.prepare((x,))

    def ort_loop() -> float:
        for _ in range(10):
            subject.timed(feed)
        times = []
        for _ in range(300):
            t = time.perf_counter()
            subject.timed(feed)
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    ours, theirs = {"torch": [], "ort": []}, {"torch": [], "ort": []}
    for _ in range(3):  # interleaved, best of three: a busy box disturbs some rounds
        ours["torch"].append(measure(loaded, threads=1, min_run_time=0.1,
                                     batch_size=2).latency_ms_median)
        with torch.inference_mode():  # one call per measurement: a median of calls, as ours
            calls = [timer.timeit(1).median for _ in range(200)]
        theirs["torch"].append(float(np.median(calls)) * 1e3)
        ours["ort"].append(measure(load_model(tiny_int8), threads=1, min_run_time=0.1,
                                   batch_size=2).latency_ms_median)
        theirs["ort"].append(ort_loop())
    for runtime in ours:
        assert 0.5 < min(ours[runtime]) / min(theirs[runtime]) < 2.0, (runtime, ours, theirs)


# --------------------------------------------------------------------- layers


def test_layers_of_a_torch_model_add_up(trained_tiny):
    loaded = load_model(trained_tiny)
    rec = measure(loaded, threads=1, min_run_time=0.1, batch_size=2)
    prof = profile_layers(loaded, inputs=(1, 8, 8), threads=1, min_run_time=0.1,
                          whole_ms=rec.latency_ms_median)
    rows = prof["rows"]
    assert prof["tool"].startswith("forward hooks") and prof["runs"] >= 10
    assert prof["macs_total"] == sum(r["macs"] for r in rows) == rec.macs  # exactly
    assert sum(r["params"] for r in rows) == rec.params
    timed = [r["ms"] for r in rows if r["ms"] is not None]
    assert timed == sorted(timed, reverse=True)
    outside = next(r for r in rows if r["name"].startswith("(outside leaf layers"))
    assert prof["total_ms"] == pytest.approx(sum(timed) - outside["ms"])
    assert outside["ms"] == pytest.approx(max(0.0, rec.latency_ms_median - prof["total_ms"]))
    assert sum(r["share"] for r in rows if r["share"] is not None) == pytest.approx(
        100.0 * max(1.0, prof["coverage"]))
    # This model runs in ~0.04 ms, where the profiler's per-node cost and scheduler noise
    # weigh: coverage is ~1.2 typically, and 3.1 was seen once in CI. The real bound (10 %)
    # is examples/bench_report_timing.py's, on PDModel. Here: same order of magnitude.
    assert 0.2 < prof["coverage"] < 5.0  # loose: a shared CI box; the benchmark checks 10 %
    conv = next(r for r in rows if r["name"] == "stem.0")
    assert conv["type"] == "Conv2d" and conv["macs"] == 8 * 8 * conv["params"]
    assert conv["bytes"] == 4 * conv["params"]


def test_layers_of_an_int8_onnx_file(tiny_int8):
    rec = measure(load_model(tiny_int8), threads=1, min_run_time=0.1, batch_size=2)
    prof = profile_layers(load_model(tiny_int8), inputs=(1, 8, 8), threads=1,
                          min_run_time=0.1, whole_ms=rec.latency_ms_median)
    rows = prof["rows"]
    assert prof["tool"] == "onnxruntime profiler"
    assert prof["macs_total"] == rec.macs  # exactly the fp32 model's MACs
    kinds = {r["type"]: r["precision"] for r in rows}
    assert kinds["QLinearConv"] == "int8" and kinds["QuantizeLinear"] == "q/dq"
    assert prof["by_precision"]["int8"]["nodes"] >= 5
    assert prof["qdq_ms"] == pytest.approx(sum(r["ms"] for r in rows if r["precision"] == "q/dq"))
    assert isinstance(prof["fp32_compute"], list)
    qconv = [r for r in rows if r["type"] == "QLinearConv"]
    assert all(r["bytes"] < 2 * r["params"] for r in qconv)  # int8 weights (+ int32 bias)
    # This model runs in ~0.04 ms, where the profiler's per-node cost and scheduler noise
    # weigh: coverage is ~1.2 typically, and 3.1 was seen once in CI. The real bound (10 %)
    # is examples/bench_report_timing.py's, on PDModel. Here: same order of magnitude.
    assert 0.2 < prof["coverage"] < 5.0
    assert any(r["name"].startswith("(outside nodes") for r in rows)


def test_report_layers_formats(trained_tiny):
    res = _report(trained_tiny, "--layers", "--top", "3", *FAST)
    assert "layers of" in res.stdout and "rest (" in res.stdout
    assert "MACs column sums to" in res.stdout and "= the model's MACs" in res.stdout
    (row,) = json.loads(_report(trained_tiny, "--layers", "-f", "json", *FAST).stdout)
    assert {"rows", "total_ms", "runs", "tool", "macs_total", "whole_model_median_ms",
            "coverage"} <= set(row["layers"])
    assert row["layers"]["whole_model_median_ms"] == row["latency_ms_median"]
    assert set(row["layers"]["rows"][0]) >= {"name", "type", "params", "macs", "bytes", "ms",
                                             "share"}
    csv = _report(trained_tiny, "--layers", "-f", "csv", *FAST).stdout.splitlines()
    assert csv[0] == "model,runtime,name,type,precision,params,macs,bytes,ms,share,calls"
    assert len(csv) - 1 == len(row["layers"]["rows"])  # csv keeps every layer
    md = _report(trained_tiny, "--layers", "--top", "3", "-f", "markdown", *FAST).stdout
    assert "| layer " in md and "% time" in md and "rest (" in md


def test_report_two_models_lines_up_layers(trained_tiny, tiny_pruned):
    res = _report(trained_tiny, tiny_pruned, "--layers", "--top", "40", "-f", "markdown",
                  *FAST)
    assert "x faster (B vs A)" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("| stem.0 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] != "-" and cells[6] != "-"  # both models have stem.0: MACs on both sides
    rows = json.loads(_report(trained_tiny, tiny_pruned, "--layers", "-f", "json",
                              *FAST).stdout)
    a = {r["name"]: r for r in rows[0]["layers"]["rows"]}
    b = {r["name"]: r for r in rows[1]["layers"]["rows"]}
    assert b["stem.0"]["macs"] < a["stem.0"]["macs"]  # half the channels pruned


def test_layers_refuse_torchscript(trained_tiny, tmp_path):
    scripted = tmp_path / "s.pt"
    torch.jit.save(torch.jit.script(load_model(trained_tiny).model.eval()), str(scripted))
    res = runner.invoke(app, ["report", str(scripted), "--trust", "--layers", "--input-shape",
                              "1,8,8", *FAST])  # TorchScript runs code: it needs --trust
    assert res.exit_code == 1
    assert "--layers needs an eager PyTorch model or an ONNX file" in res.stderr


# --------------------------------------------------------------------- agreement


def test_agreement_of_a_model_with_itself_and_its_int8(trained_tiny, tiny_int8, digits):
    loaded = load_model(trained_tiny)
    same = agreement(loaded, loaded, inputs=(1, 8, 8))
    assert same == {"fidelity_top1_agreement": 100.0, "fidelity_rel_error": 0.0}
    q = agreement(loaded, load_model(tiny_int8), data=digits, n=359)
    assert q["fidelity_top1_agreement"] >= 90.0 and 0 < q["fidelity_rel_error"] < 0.5


def test_report_agreement_column(trained_tiny, tiny_int8):
    res = _report(trained_tiny, tiny_int8, "--agreement", "--data", "digits", "-f", "json",
                  *FAST)
    base, q = json.loads(res.stdout)
    assert base["fidelity_top1_agreement"] == 100.0 and base["fidelity_rel_error"] == 0.0
    assert q["fidelity_top1_agreement"] >= 90.0
    md = _report(trained_tiny, tiny_int8, "--agreement", "--samples", "64", "-f", "markdown",
                 *FAST).stdout
    assert "agrees % vs row 1" in md.splitlines()[0]  # generated inputs: no --data needed


def test_agreement_needs_matching_outputs(trained_tiny):
    from torch import nn

    from torchslim.compress.errors import TorchslimError

    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(TorchslimError, match="outputs differ in shape"):
        agreement(load_model(trained_tiny), other, inputs=(1, 8, 8))


def test_layers_and_agreement_of_a_two_input_model():
    """A model of two inputs (an InputSpec): every layer's MACs counted, agreement with a
    copy whose weights moved by 1e-4 close to perfect."""
    from torch import nn

    from torchslim.compress.inputs import InputSpec

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 5)

        def forward(self, x, y):
            return self.head(torch.relu(self.a(x) + self.b(y)))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    spec = InputSpec.parse(["1,8", "1,4"])
    prof = profile_layers(model, inputs=spec, threads=1, min_run_time=0.02)
    macs = {r["name"]: r["macs"] for r in prof["rows"]}
    assert (macs["a"], macs["b"], macs["head"]) == (8 * 16, 4 * 16, 16 * 5)
    assert prof["macs_total"] == measure(model, inputs=spec, threads=1, min_run_time=0.01,
                                         batch_size=2).macs
    nudged = TwoInputs().eval()
    nudged.load_state_dict({k: v + 1e-4 * torch.randn_like(v)
                            for k, v in model.state_dict().items()})
    agreed = agreement(model, nudged, inputs=spec, n=64)
    assert agreed["fidelity_top1_agreement"] >= 95.0
    assert 0 < agreed["fidelity_rel_error"] < 1e-2
