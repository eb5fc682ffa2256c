"""The accuracy-guarded search: honest split, goal checks, resume, budget, diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress import onnx_quant as oq
from torchslim.compress import qdiag
from torchslim.compress.candidates import (
    Context,
    Spec,
    baseline_record,
    held_out_indices,
    recipe,
    search_split,
    spec_from_recipe,
)
from torchslim.compress.data import load_data, split_indices
from torchslim.compress.io import load_model
from torchslim.compress.search import SearchConfig, choose, conclude, front, search
from torchslim.compress.train import evaluate

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.02"]


@pytest.fixture(scope="module")
def split(digits):
    return search_split(digits, 0.5, 0)


def _ctx(trained_tiny, split, workdir: Path, suffix=".pt") -> tuple[Context, dict]:
    loaded = load_model(trained_tiny)
    ctx = Context(teacher=loaded.model.float().eval(), meta=loaded.meta, data=split,
                  workdir=workdir, suffix=suffix, threads=1, min_run_time=0.02)
    return ctx, baseline_record(loaded, ctx)


def test_three_way_split_never_leaks(digits, split):
    from sklearn.datasets import load_digits

    y = torch.from_numpy(load_digits().target.astype(np.int64))
    train, held, _ = split_indices(y, 0.2, 0.0, 0)  # what `torchslim train` holds out
    v, t = held_out_indices(y[held], 0.5, 0)
    val, test = held[v], held[t]
    sets = [set(train.tolist()), set(val.tolist()), set(test.tolist())]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert len(sets[0] | sets[1] | sets[2]) == len(y) == 1797
    # the search's tensors are exactly those images: train is the input model's train split
    assert torch.equal(split.train.tensors[1], y[train])
    assert torch.equal(split.val.tensors[1], y[val]) and torch.equal(split.test.tensors[1],
                                                                     y[test])
    assert len(split.val) + len(split.test) == len(digits.val)
    assert set(split.test.tensors[1].tolist()) == set(range(10))  # stratified: all classes


def test_front_keeps_only_undominated():
    recs = [{"key": k, "file_bytes": b, "val_accuracy": a}
            for k, b, a in [("a", 10, 90.0), ("b", 20, 95.0), ("c", 30, 94.0), ("d", 5, 80.0)]]
    assert [r["key"] for r in front(recs, "file_bytes")] == ["d", "a", "b"]


def test_short_rank_fine_tunes_are_never_chosen():
    base = {"val_accuracy": 97.0, "test_accuracy": 98.0, "file_bytes": 1000}
    rank = {"key": "r", "label": "prune 0.4 + distill 3 + int8", "file_bytes": 100,
            "val_accuracy": 97.0, "test_accuracy": 96.0, "stage": "rank"}
    full = {"key": "f", "label": "prune 0.2 + distill 12 + int8", "file_bytes": 300,
            "val_accuracy": 96.8, "test_accuracy": 98.0, "stage": "final"}
    old = {"key": "o", "label": "int8", "file_bytes": 400, "val_accuracy": 97.0,
           "test_accuracy": 98.0}  # a record of an older search: no stage, choosable
    cfg = SearchConfig(max_acc_drop=0.5)
    assert choose([rank, full, old], base, cfg)["key"] == "f"  # smaller rank one skipped
    assert choose([rank, old], base, cfg)["key"] == "o"
    result = conclude([rank], base, cfg, None, 1.0)
    assert result.status == "infeasible" and result.chosen["key"] == "r"  # shown, not chosen
    assert "no candidate meets the goal" in result.message


def _scripted_staged(monkeypatch, lost, objective="size", precisions=("fp32",)):
    """Run the staged strategy on a session whose accuracy drop is ``lost(epochs, ratio)``."""
    from torchslim.compress import strategies
    from torchslim.compress.search import SearchConfig as Cfg

    cfg = Cfg(max_acc_drop=0.5, max_prune=0.4, prune_step=0.1, swaps=("none",),
              precisions=precisions, objective=objective)
    base = {"val_accuracy": 97.0, "test_accuracy": 98.0, "file_bytes": 1000}

    class Fake:
        def __init__(self):
            self.cfg, self.records = cfg, []

        def evaluate(self, spec, stage="final"):
            d = lost(spec.epochs, spec.prune) if spec.prune else 0.0
            rec = {"key": spec.key, "label": spec.label(), "spec": spec.__dict__,
                   "stage": stage, "file_bytes": int(1000 * (1 - spec.prune)),
                   "latency_ms_median": 1 - spec.prune, "val_accuracy": 97.0 - d,
                   "test_accuracy": 98.0 - d}
            self.records.append(rec)
            return rec

        def ok(self, rec, slack=0.0):
            return base["val_accuracy"] - rec["val_accuracy"] <= cfg.max_acc_drop + slack

    monkeypatch.setattr(strategies, "_proxy", lambda s, swap, r: 1 - r)
    fake = Fake()
    strategies.staged(fake, ("none",), precisions)
    full = [r["spec"]["prune"] for r in fake.records if r["spec"]["epochs"] == 12]
    return full, choose(fake.records, base, cfg), fake.records


def test_latency_finalists_also_measure_fp32(monkeypatch):
    """For latency, a level whose int8 holds gets its fp32 export measured too (ONNX
    Runtime's fp32 can be the faster); for size it does not (int8 is always smaller)."""
    def lost(epochs, r):
        return 0.0 if epochs == 12 else 1.0

    for objective, expect in (("latency", True), ("size", False)):
        _, _, recs = _scripted_staged(monkeypatch, lost, objective, ("fp32", "int8"))
        final = {r["key"] for r in recs if r["stage"] == "final"}
        assert "none-p0.40-e12-int8" in final
        assert ("none-p0.40-e12-fp32" in final) == expect


def test_latency_within_the_timer_noise_is_a_tie_won_by_accuracy():
    base = {"val_accuracy": 97.0, "test_accuracy": 98.0, "latency_ms_median": 4.0}
    cfg = SearchConfig(max_acc_drop=0.5, objective="latency")

    def rec(key, ms, acc):
        return {"key": key, "label": key, "latency_ms_median": ms, "val_accuracy": acc,
                "test_accuracy": acc, "stage": "final"}

    near = [rec("swap", 0.388, 97.0), rec("prune", 0.420, 97.5), rec("slow", 0.9, 99.0)]
    assert choose(near, base, cfg)["key"] == "prune"  # 8 % slower, one image better
    far = [rec("swap", 0.30, 97.0), rec("prune", 0.420, 97.5)]
    assert choose(far, base, cfg)["key"] == "swap"  # 40 % faster: not noise
    assert choose([rec("a", 0.40, 97.0), rec("b", 0.41, 97.0)], base, cfg)["key"] == "a"


def test_a_level_the_short_fine_tune_rejected_gets_a_full_one(monkeypatch):
    """Ranking with 3 epochs rejects prune 0.3 (3 points down); the full fine-tune of 0.2
    meets the guard, and with time left 0.3 gets its full fine-tune too, and is chosen.
    Since 0.3 held, 0.4 (which ranking never tried) gets one as well, and misses."""
    table = {3: {0.1: 1.0, 0.2: 1.5, 0.3: 3.0, 0.4: 5.0}, 12: {0.1: 0.0, 0.2: 0.0, 0.3: 0.4}}

    def lost(epochs, r):
        return table[epochs].get(r, 0.4 + (r - 0.3) * 8)  # past 0.3: 0.35 loses 0.8

    full, chosen, _ = _scripted_staged(monkeypatch, lost)
    assert 0.2 in full and 0.3 in full and 0.4 in full
    assert chosen["key"] == "none-p0.30-e12-fp32"


def test_climbing_past_a_level_the_ranking_rejected(monkeypatch):
    """Ranking rejects everything above 0.1; full fine-tunes hold up to 0.4. The second
    chance at 0.2 holds, so the search climbs 0.3, 0.4 and chooses 0.4."""
    def lost(epochs, r):
        return 0.0 if epochs == 12 else (1.0 if r <= 0.1 else 9.0)

    full, chosen, _ = _scripted_staged(monkeypatch, lost)
    assert {0.2, 0.3, 0.4} <= set(full) and chosen["spec"]["prune"] == 0.4


def test_refining_after_a_climb_that_missed(monkeypatch):
    """The second chance at 0.2 holds, the climb's 0.3 misses: refining tries 0.25."""
    def lost(epochs, r):
        return (0.0 if r <= 0.25 else 2.0) if epochs == 12 else (1.0 if r <= 0.1 else 9.0)

    full, chosen, _ = _scripted_staged(monkeypatch, lost)
    assert 0.3 in full and 0.25 in full and chosen["spec"]["prune"] == 0.25


def test_refining_between_the_level_that_held_and_the_next(monkeypatch):
    """Full fine-tunes hold up to prune 0.325 (drop 4 x (r - 0.2)); the grid has 0.3 and
    0.4; refining halves the gap while it is over a quarter step and finds a level above
    0.3 that holds, trying no more than three between."""
    def lost(epochs, r):
        return max(0.0, (r - 0.2) * 4) + (1.5 if epochs == 3 else 0.0)

    full, chosen, _ = _scripted_staged(monkeypatch, lost)
    between = [r for r in full if 0.3 < r < 0.4]
    assert 0.35 in between and 1 < len(between) <= 3
    r = chosen["spec"]["prune"]
    assert 0.3 < r < 0.35 and lost(12, r) <= 0.5
    assert all(lost(12, x) > 0.5 for x in full if x > r)  # everything above it missed


def test_recipe_round_trips_to_the_same_candidate():
    for spec in (Spec("dws", 0.3, 12, "int8"), Spec("none", 0.5, 4, "qat"), Spec(),
                 Spec("dws-hard", 0.0, 2, "fp16")):
        assert spec_from_recipe(recipe(spec)) == spec
    mixed = Spec("dws", 0.2, 3, "int8-mixed", 2)
    assert spec_from_recipe(recipe(mixed, exclude=("a", "b"))) == mixed
    # the fine-tune's label weight is part of the recipe, so --dump-recipe repeats it
    steps = {c.method: c for c in recipe(Spec("none", 0.5, 4, "qat"), alpha=0.5)}
    assert steps["distill"].alpha == 0.5
    assert {c.method: c for c in recipe(Spec("none", 0.5, 4, "qat"))}["distill"].alpha == 0.3


def test_qdiag_measures_layers_and_keeping_the_worst_in_fp32(trained_tiny, digits, tmp_path):
    from torchslim.compress.quantize import QuantizeConfig, quantize_model

    model = load_model(trained_tiny).model
    calib = oq.calibration_batches(digits.train, 2, 32)
    diag = qdiag.diagnose(model, (1, 8, 8), calib)
    convs = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert len(diag.layers) == convs  # every Conv/Linear is one ONNX compute node
    assert all(15.0 < lay.sqnr_db < 80.0 for lay in diag.layers)  # int8: ~1-10 % error
    for lay in diag.layers:  # the two error figures agree: rel = 10^(-SQNR/20)
        assert lay.rel_error == pytest.approx(10 ** (-lay.sqnr_db / 20), rel=1e-3)
    worst = diag.worst(1)
    res = quantize_model(model, QuantizeConfig(mode="static", exclude=tuple(worst)),
                         out_path=tmp_path / "m.onnx", data=digits)
    assert [f.split(" ")[0] for f in res.fallbacks] == worst  # exactly that node stays fp32


def test_resume_skips_measured_candidates(trained_tiny, split, tmp_path):
    cfg = SearchConfig(max_acc_drop=100.0, swaps=("none",), precisions=("fp32",),
                       max_prune=0.2, prune_step=0.2, rank_epochs=1, final_epochs=1,
                       trials=1)
    ctx, base = _ctx(trained_tiny, split, tmp_path / "wd")
    seen: list[tuple[str, bool]] = []
    first = search(cfg, ctx, base, on_record=lambda r, resumed: seen.append((r["key"],
                                                                             resumed)))
    assert first.stopped == "1 trials measured" and len(first.records) == 1  # "Ctrl-C"
    ctx2, _ = _ctx(trained_tiny, split, tmp_path / "wd")
    seen.clear()
    cfg = SearchConfig(**{**cfg.__dict__, "trials": None})
    second = search(cfg, ctx2, base, on_record=lambda r, resumed: seen.append((r["key"],
                                                                              resumed)))
    assert second.stopped is None and len(second.records) == 2  # input, then pruned 0.2
    resumed = [k for k, r in seen if r]
    assert resumed == [r["key"] for r in first.records]  # measured before: not measured again
    lines = (tmp_path / "wd" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == len(second.records) == len(set(json.loads(x)["key"] for x in lines))
    for old in first.records:  # same numbers, read back rather than re-measured
        new = next(r for r in second.records if r["key"] == old["key"])
        assert new["val_accuracy"] == old["val_accuracy"] and new["seconds"] == old["seconds"]


def test_time_budget_stops_the_search(trained_tiny, split, tmp_path):
    cfg = SearchConfig(max_acc_drop=0.5, swaps=("none",), precisions=("fp32",),
                       max_prune=0.4, prune_step=0.2, rank_epochs=50, final_epochs=50,
                       time_budget_s=1.0)
    ctx, base = _ctx(trained_tiny, split, tmp_path / "wd")
    result = search(cfg, ctx, base)
    # 50 epochs take minutes; the budget check inside training stops it within a step
    assert result.stopped is not None and "time budget of 1s" in result.stopped
    assert all(r["spec"]["epochs"] == 0 for r in result.records)
    assert result.seconds < 60


def _goal_cli(model, out, *extra):
    return runner.invoke(app, ["compress", str(model), "--data", "digits", "-o", str(out),
                               "--distill", "--epochs", "1", *FAST, *extra])


def test_infeasible_goal_exits_1_with_the_front(trained_tiny, tmp_path):
    out = tmp_path / "c.pt"
    res = _goal_cli(trained_tiny, out, "--max-acc-drop", "0.5", "--prune", "0.2",
                    "--target-size", "1/1000", "--trials", "3")
    assert res.exit_code == 1, res.output
    assert "goal not met" in res.stdout and "no candidate meets the goal" in res.output
    assert not out.exists()  # a model that misses the goal is not written as the answer
    doc = json.loads((tmp_path / "c.pareto.json").read_text())
    assert doc["status"] == "infeasible" and 2 <= len(doc["candidates"]) <= 3
    assert doc["fronts"]["size"] and (tmp_path / "c.pareto.png").stat().st_size > 10_000
    keys = {"recipe", "params", "macs", "file_bytes", "latency_ms_median", "val_accuracy",
            "test_accuracy", "seconds"}
    assert all(keys <= set(c) for c in doc["candidates"])
    assert "Pareto front" in res.stdout
    said = " ".join(res.stderr.split())  # 179/180 held-out digits: 1 image = 0.56 points
    assert "warning: one sample is 0.56 points of the 179-sample validation/test" in said


def test_chosen_test_accuracy_equals_an_independent_evaluation(trained_tiny, tmp_path):
    out, rec = tmp_path / "c.onnx", tmp_path / "r.toml"
    res = _goal_cli(trained_tiny, out, "--max-acc-drop", "5", "--quantize", "static",
                    "--trials", "2", "--dump-recipe", str(rec))
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c.pareto.json").read_text())
    chosen = next(c for c in doc["candidates"] if c["key"] == doc["chosen"])
    split = search_split(load_data("digits", seed=0), 0.5, 0)
    top1 = evaluate(oq.OnnxRunner(out), split.test)[0]
    assert top1 == pytest.approx(chosen["test_accuracy"], abs=1e-9)
    assert out.stat().st_size == chosen["file_bytes"]
    assert doc["baseline"]["test_accuracy"] - top1 <= 5.0  # the goal, checked on test
    again = tmp_path / "again.onnx"  # the recipe rebuilds the same candidate, no search
    res = _goal_cli(trained_tiny, again, "--max-acc-drop", "5", "--recipe", str(rec))
    assert res.exit_code == 0, res.output
    redo = json.loads((tmp_path / "again.pareto.json").read_text())["candidates"]
    assert [c["key"] for c in redo] == [doc["chosen"]]
    assert evaluate(oq.OnnxRunner(again), split.test)[0] == pytest.approx(top1)


def test_goal_usage_errors(trained_tiny, tmp_path):
    res = _goal_cli(trained_tiny, tmp_path / "c.onnx", "--max-acc-drop", "0.5",
                    "--target-size", "1/20", "--target-latency-ms", "1")
    assert res.exit_code == 2 and "at most one of" in res.output
    res = _goal_cli(trained_tiny, tmp_path / "c.onnx", "--max-acc-drop", "0.5",
                    "--target-macs", "0.5")
    assert res.exit_code == 2 and "--prune" in res.output
    res = _goal_cli(trained_tiny, tmp_path / "c.pt", "--max-acc-drop", "0.5",
                    "--quantize", "static")
    assert res.exit_code == 2 and "int8 needs -o model.onnx" in res.output


def test_dry_run_prints_space_and_estimate(trained_tiny, tmp_path):
    res = _goal_cli(trained_tiny, tmp_path / "c.onnx", "--max-acc-drop", "0.5",
                    "--dry-run", "--swap", "--prune", "0.3", "--quantize", "static")
    assert res.exit_code == 0, res.output
    assert "pruning ratios: 0, 0.1, 0.2, 0.3" in res.stdout
    assert "precisions: fp32, int8, int8-mixed" in res.stdout and "estimate: ~" in res.stdout
    assert "alpha 0.3;" in res.stdout  # the search's default label weight
    assert not (tmp_path / "c.onnx").exists()
    res = _goal_cli(trained_tiny, tmp_path / "c.onnx", "--max-acc-drop", "0.5", "--dry-run",
                    "--alpha", "0.6")
    assert res.exit_code == 0 and "alpha 0.6;" in res.stdout, res.output
    res = _goal_cli(trained_tiny, tmp_path / "c.onnx", "--max-acc-drop", "0.5", "--dry-run",
                    "--alpha", "1.5")
    assert res.exit_code == 2 and "--alpha must be in [0, 1]" in res.output


def test_the_verdict_says_gains_for_a_negative_drop():
    from torchslim.compress.search import _change

    assert _change(-1.67) == "gains 1.67 points"
    assert _change(0.56) == "loses 0.56 points" and _change(0.0) == "loses 0.00 points"
