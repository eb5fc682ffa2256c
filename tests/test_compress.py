"""`torchslim compress`: flag pipelines, recipes, the data-free path, invalid plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress.config import METHODS, config_from_dict, config_to_dict
from torchslim.compress.distill import DistillConfig
from torchslim.compress.errors import TorchslimError
from torchslim.compress.io import load_model
from torchslim.compress.lowrank import LowRankConfig
from torchslim.compress.pipeline import check_plan, order_steps
from torchslim.compress.prune import PruneConfig
from torchslim.compress.quantize import QuantizeConfig
from torchslim.compress.recipe import dump_recipe, load_recipe
from torchslim.compress.swap import SwapConfig

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.02"]


def _compress(*args):
    res = runner.invoke(app, ["compress", *map(str, args), *FAST])
    return res


def test_flag_pipeline_runs_every_step_in_order(trained_tiny, tmp_path):
    out = tmp_path / "slim.onnx"
    # flags deliberately out of order: the pipeline still runs swap -> prune -> distill -> q
    res = _compress(trained_tiny, "-o", out, "--quantize", "static", "--distill", "--epochs",
                    "2", "--prune", "0.25", "--swap", "--data", "digits")
    assert res.exit_code == 0, res.output
    steps = json.loads((tmp_path / "slim.report.json").read_text())
    assert [s["step"] for s in steps] == ["input", "swap", "prune", "distill", "quantize"]
    base, swap, prune, distill, quant = steps
    assert swap["params"] < base["params"] and prune["params"] < swap["params"]
    assert swap["macs"] < base["macs"] and prune["macs"] < swap["macs"]
    assert distill["params"] == prune["params"]
    assert quant["runtime"] == "onnxruntime" and quant["file_bytes"] < distill["file_bytes"]
    assert distill["accuracy"] >= prune["accuracy"]  # best-epoch recovery never loses ground
    meta = load_model(out).meta
    assert [h["method"] for h in meta.history] == ["train", "swap", "prune", "distill",
                                                    "quantize"]
    assert meta.history[2]["after"]["params"] == prune["params"]
    fp32 = load_model(tmp_path / "slim.fp32.pt")
    assert sum(p.numel() for p in fp32.model.parameters()) == distill["params"]
    md = (tmp_path / "slim.report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 8  # header, separator, input in torch and in ONNX Runtime, 4 steps
    assert "| input " in table[3] and "onnxruntime" in table[3]
    assert "x faster vs fastest fp32" in table[0] and "against input in" in md


def test_recipe_dump_rerun_reproduces(trained_tiny, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    recipe = tmp_path / "r.toml"
    res = _compress(trained_tiny, "-o", a, "--act", "hard", "--target-macs", "0.6",
                    "--distill", "--epochs", "1", "--data", "digits", "--dump-recipe", recipe)
    assert res.exit_code == 0, res.output
    res = _compress(trained_tiny, "-o", b, "--recipe", recipe, "--data", "digits")
    assert res.exit_code == 0, res.output
    ra = json.loads((tmp_path / "a.report.json").read_text())
    rb = json.loads((tmp_path / "b.report.json").read_text())
    for x, y in zip(ra, rb, strict=True):
        assert (x["step"], x["params"], x["macs"]) == (y["step"], y["params"], y["macs"])
        assert x["accuracy"] == pytest.approx(y["accuracy"], abs=0.6)  # 2 of 359 images
    ma, mb = load_model(a).model, load_model(b).model
    assert [tuple(p.shape) for p in ma.parameters()] == [tuple(p.shape) for p in mb.parameters()]


def test_data_free_path_reports_fidelity(trained_tiny, tmp_path):
    out = tmp_path / "fp16.pt"
    res = _compress(trained_tiny, "-o", out, "--quantize", "fp16")
    assert res.exit_code == 0, res.output
    assert "no --data" in res.stderr
    # the live table ends its line off a terminal too: "wrote ..." is a line of its own
    assert any(line.startswith("wrote ") for line in res.stderr.splitlines())
    steps = json.loads((tmp_path / "fp16.report.json").read_text())
    assert steps[1]["accuracy"] is None
    assert steps[1]["fidelity_top1_agreement"] >= 99.0  # fp16 barely moves the logits
    assert steps[1]["fidelity_rel_error"] < 1e-2
    assert steps[0]["fidelity_top1_agreement"] == 100.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "static"], "calibrates on real images: add --data"),
        (["--distill"], "needs --data"),
        (["--quantize", "int3"], "unknown quantize mode 'int3'"),
        (["--prune", "1.5", "--data", "digits"], "--ratio"),
        ([], "no steps to run"),
    ],
)
def test_invalid_plans_fail_before_work(trained_tiny, tmp_path, extra, message):
    out = tmp_path / "o.pt"
    res = _compress(trained_tiny, "-o", out, *extra)
    assert res.exit_code in (1, 2), res.output
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[steps]]\nmethod = "quantize"\nmode = "fp16"\n[[steps]]\nmethod = "prune"\n'
         "ratio = 0.5\n", "'prune' cannot come after 'quantize'"),
        ('[[steps]]\nmethod = "shrink"\n', "unknown method 'shrink'"),
        ('[[steps]]\nmethod = "prune"\nratoi = 0.5\n', "unknown key(s) ratoi"),
        ("steps = 3\n", "needs a list of tables under 'steps'"),
        ("[[steps]\n", "is not valid toml"),
    ],
)
def test_bad_recipes(trained_tiny, tmp_path, body, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    res = _compress(trained_tiny, "-o", tmp_path / "o.pt", "--recipe", recipe)
    assert res.exit_code == 1, res.output
    assert message in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_every_method_config_round_trips(tmp_path):
    configs = [
        SwapConfig(conv="depthwise-separable", act="hard", skip=("stem",)),
        LowRankConfig(rank_ratio=0.3),
        PruneConfig(target_macs=0.5, importance="l1", ignore=("head",)),
        DistillConfig(epochs=3, matches=("features.0:features.1",)),
        QuantizeConfig(mode="dynamic"),
    ]
    assert {type(c).method for c in configs} == set(METHODS)
    for c in configs:
        assert config_from_dict(json.loads(json.dumps(config_to_dict(c)))) == c
    for suffix in ("toml", "yaml", "json"):
        path = dump_recipe(configs, tmp_path / f"r.{suffix}")
        assert load_recipe(path) == configs


def test_order_and_plan_rules():
    q, p, s = QuantizeConfig(mode="fp16"), PruneConfig(ratio=0.5), SwapConfig(act="hard")
    assert order_steps([q, p, s]) == [s, p, q]
    assert "add --distill" in check_plan([s, p], has_data=True)[0]
    with pytest.raises(TorchslimError, match="only one quantize"):
        check_plan([q, q], has_data=False)


def test_wrong_output_suffix_is_a_usage_error(trained_tiny, tmp_path):
    res = _compress(trained_tiny, "-o", tmp_path / "o.pt", "--quantize", "dynamic")
    assert res.exit_code == 2
    assert "writes a .onnx file" in res.stderr


def test_fidelity_of_identity_is_perfect(trained_tiny):
    from torchslim.compress.pipeline import fidelity

    model = load_model(trained_tiny).model
    f = fidelity(model, model, (1, 8, 8))
    assert f == {"fidelity_top1_agreement": 100.0, "fidelity_rel_error": 0.0}
    assert torch.is_tensor(model(torch.zeros(1, 1, 8, 8)))


def test_torchscript_input_is_refused_in_one_line(trained_tiny, tmp_path):
    ts = tmp_path / "m.ts"
    torch.jit.trace(load_model(trained_tiny).model, torch.zeros(1, 1, 8, 8)).save(str(ts))
    res = _compress(ts, "-o", tmp_path / "o.pt", "--quantize", "fp16", "--trust")
    assert res.exit_code == 1
    assert "cannot transform a torchscript file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # no table, no warning before it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ts"]


def test_side_files_keep_a_dotted_output_name():
    """"pd-lr0.003-s1.onnx" and "pd-lr0.003-s2.onnx" once shared "pd-lr0.report.json"."""
    from torchslim.cli.compress import report_paths
    from torchslim.cli.goal import pareto_paths

    out = Path("runs/pd-lr0.003-s1.onnx")
    assert [p.name for p in report_paths(out)] == ["pd-lr0.003-s1.report.md",
                                                   "pd-lr0.003-s1.report.json"]
    assert [p.name for p in pareto_paths(out)] == ["pd-lr0.003-s1.pareto.json",
                                                   "pd-lr0.003-s1.pareto.png"]
