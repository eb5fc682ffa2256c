"""The goal search on models where a method does not apply, and when a candidate or the run
fails: what does not apply is left out with a note, failures are recorded and skipped, and
whatever ends the search, what met the goal is written."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from torchslim.cli.app import app
from torchslim.compress import candidates
from torchslim.compress.candidates import Context, baseline_record, search_split
from torchslim.compress.io import load_model
from torchslim.compress.search import SearchConfig, search

runner = CliRunner()
FAST = ["--threads", "1", "--min-time", "0.02"]

# Written as a user writes them, outside torchslim: a MobileNet-like net whose convolutions
# are all 1x1 or depthwise (nothing for the depthwise-separable swap to replace), and a
# Hugging Face GPT-2 with a classification head (torch-pruning cannot trace it).
USERNETS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Block(nn.Module):
        def __init__(self, cin, cout, expand=2):
            super().__init__()
            mid = cin * expand
            self.expand = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.project = nn.Conv2d(mid, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)

        def forward(self, x):
            h = F.relu6(self.bn1(self.expand(x)))
            h = F.relu6(self.bn2(self.dw(h)))
            return self.bn3(self.project(h))


    class TinyMobile(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 1)
            self.b1, self.b2 = Block(16, 24), Block(24, 32)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.b2(F.max_pool2d(self.b1(F.relu(self.stem(x))), 2))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


    class GPTClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            from transformers import GPT2Config, GPT2Model

            cfg = GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                             bos_token_id=0, eos_token_id=0)
            self.gpt = GPT2Model(cfg)
            self.fc = nn.Linear(16, 3)

        def forward(self, tokens):
            return self.fc(self.gpt(tokens).last_hidden_state[:, -1])
''')


def _train(model, xs, y, epochs, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits):
    """The user's folder: their module, their models saved with torch.save(model), and a
    token data set for the GPT-2 classifier (the class is in the first tokens' range)."""
    root = tmp_path_factory.mktemp("userproject")
    (root / "usernets.py").write_text(USERNETS)
    sys.path.insert(0, str(root))
    try:
        import usernets
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    xs, y = digits.train.tensors
    torch.save(_train(usernets.TinyMobile(), xs, y, 6), root / "mobile.pt")
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 100)
    tokens = (labels[:, None] * 33 + g.integers(0, 33, (300, 12))).astype(np.int64)
    np.savez(root / "tokens.npz", x=tokens, y=labels)
    if importlib.util.find_spec("transformers") is not None:  # the `test` extra installs it
        gpt = _train(usernets.GPTClassifier(), torch.from_numpy(tokens),
                     torch.from_numpy(labels), 4)
        torch.save(gpt, root / "gpt.pt")
    sys.modules.pop("usernets", None)  # loading must find it through --code-path
    return root


def _goal(project, model, out, data, *extra):
    return runner.invoke(app, ["compress", str(project / model), "--trust", "--code-path",
                               str(project), "--data", data, "-o", str(out), "--distill",
                               "--epochs", "1", *FAST, *extra])


def test_only_1x1_and_depthwise_convs_leave_the_swap_out(project, tmp_path):
    out = tmp_path / "m.pt"
    res = _goal(project, "mobile.pt", out, "digits", "--max-acc-drop", "3", "--swap",
                "--prune", "0.1", "--workdir", str(tmp_path / "wd"))
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    assert ("note: no standard KxK convolution (7 Conv2d: 5 1x1, 2 grouped or depthwise): "
            "the swap is left out of the search") in said
    doc = json.loads((tmp_path / "m.pareto.json").read_text())
    assert doc["status"] == "met" and doc["left_out"] == [
        "no standard KxK convolution (7 Conv2d: 5 1x1, 2 grouped or depthwise): the swap "
        "is left out of the search"]
    assert doc["space"]["swaps"] == ["none"] and doc["space"]["max_prune"] == 0.1
    assert not doc["failed"]
    assert {c["spec"]["swap"] for c in doc["candidates"]} == {"none"}
    assert any(c["spec"]["prune"] > 0 for c in doc["candidates"])  # pruning still searched
    space = json.loads((tmp_path / "wd" / "space.json").read_text())
    assert space == doc["space"]
    chosen = next(c for c in doc["candidates"] if c["key"] == doc["chosen"])
    assert out.stat().st_size == chosen["file_bytes"]
    assert doc["baseline"]["test_accuracy"] - chosen["test_accuracy"] <= 3.0
    assert (tmp_path / "m.pareto.png").stat().st_size > 10_000


def test_a_model_torch_pruning_refuses_is_searched_without_pruning(project, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "g.pt"
    res = _goal(project, "gpt.pt", out, str(project / "tokens.npz"), "--max-acc-drop", "2",
                "--swap", "--prune", "0.3", "--quantize", "fp16")
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    assert "note: no convolution: the swap is left out of the search" in said
    assert "note: cannot prune structurally (torch-pruning cannot trace this model" in said
    assert "pruning is left out of the search" in said
    doc = json.loads((tmp_path / "g.pareto.json").read_text())
    assert doc["space"] == {"swaps": ["none"], "max_prune": 0.0,
                            "precisions": ["fp32", "fp16"], "notes": doc["left_out"]}
    keys = [c["key"] for c in doc["candidates"]]
    assert keys == ["input-fp16", "input-fp32"]  # nothing to train: the two precisions
    assert doc["chosen"] == "input-fp16" and doc["status"] == "met"
    fp16 = load_model(out, trust=True, code_paths=(project,)).model
    assert next(fp16.parameters()).dtype == torch.float16
    fp32 = doc["candidates"][1]  # 5.2k weights: half of each weight's bytes, less metadata
    assert out.stat().st_size == doc["candidates"][0]["file_bytes"] < 0.8 * fp32["file_bytes"]


@pytest.fixture(scope="module")
def split(digits):
    return search_split(digits, 0.5, 0)


def _ctx(trained_tiny, split, workdir: Path) -> tuple[Context, dict]:
    loaded = load_model(trained_tiny)
    ctx = Context(teacher=loaded.model.float().eval(), meta=loaded.meta, data=split,
                  workdir=workdir, suffix=".pt", threads=1, min_run_time=0.02)
    return ctx, baseline_record(loaded, ctx)


def test_a_candidate_that_raises_is_recorded_and_skipped(trained_tiny, split, tmp_path,
                                                         monkeypatch):
    real = candidates.Builder._train
    calls: list[str] = []

    def train(self, spec, path):
        calls.append(spec.trained_key)
        if spec.prune == 0.2:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line of the trace")
        return real(self, spec, path)

    monkeypatch.setattr(candidates.Builder, "_train", train)
    cfg = SearchConfig(max_acc_drop=100.0, swaps=("none",), precisions=("fp32", "fp16"),
                       max_prune=0.4, prune_step=0.2, rank_epochs=1, final_epochs=1)
    ctx, base = _ctx(trained_tiny, split, tmp_path / "wd")
    result = search(cfg, ctx, base)
    assert result.stopped is None
    failed = {r["key"]: r["failed"] for r in result.failed}
    oom = "RuntimeError: CUDA out of memory (simulated)"  # its first line
    assert failed == {"none-p0.20-e1-fp16": oom, "none-p0.20-e1-fp32": oom}
    assert calls.count("none-p0.20-e1") == 1  # fp32 of the same model is not retrained
    # the search went on: 0.2 became the level that missed and the gap below it was refined
    assert [r["key"] for r in result.records] == [
        "input-fp16", "input-fp32", "none-p0.20-e1-fp16", "none-p0.20-e1-fp32",
        "none-p0.10-e1-fp16", "none-p0.15-e1-fp16"]
    assert result.chosen["key"] == "none-p0.15-e1-fp16" and result.status == "met"
    assert all(result.chosen["key"] != k for keys in result.fronts.values() for k in failed)
    lines = [json.loads(x) for x in (tmp_path / "wd" / "candidates.jsonl").read_text()
             .splitlines()]
    assert [x["failed"] for x in lines if "failed" in x] == list(failed.values())
    doc = result.to_dict(cfg)
    assert doc["failed"] == failed
    # a rerun reads the failure back instead of trying the candidate again
    calls.clear()
    ctx2, _ = _ctx(trained_tiny, split, tmp_path / "wd")
    again = search(cfg, ctx2, base)
    assert calls == [] and again.chosen["key"] == result.chosen["key"]


def test_an_interrupt_after_a_feasible_candidate_writes_it(trained_tiny, tmp_path,
                                                            monkeypatch):
    real = candidates.Builder.build
    built: list[str] = []

    def build(self, spec):
        if built:  # Ctrl-C while the second candidate is built
            raise KeyboardInterrupt
        built.append(spec.key)
        return real(self, spec)

    monkeypatch.setattr(candidates.Builder, "build", build)
    out = tmp_path / "c.pt"
    res = runner.invoke(app, ["compress", str(trained_tiny), "--data", "digits", "-o",
                              str(out), "--max-acc-drop", "5", *FAST, "--prune", "0.2",
                              "--distill", "--epochs", "1", "--workdir", str(tmp_path / "wd")])
    assert built == ["input-fp32"]
    assert res.exit_code == 0, res.output  # the goal was met by what was measured
    said = " ".join(res.stderr.split())
    assert "interrupted: writing what was found" in said and "rerun the same command" in said
    doc = json.loads((tmp_path / "c.pareto.json").read_text())
    assert doc["stopped"] == "interrupted" and doc["chosen"] == "input-fp32"
    assert doc["status"] == "met" and (tmp_path / "c.pareto.png").exists()
    assert out.stat().st_size == doc["candidates"][0]["file_bytes"]
    # the live table ends its line before the next message
    lines = res.stderr.splitlines()
    border = max(i for i, x in enumerate(lines) if "─" in x)
    assert not any(w in lines[border] for w in ("interrupted", "wrote", "error"))


def test_an_interrupt_before_anything_met_the_goal_exits_130(trained_tiny, tmp_path,
                                                             monkeypatch):
    def build(self, spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(candidates.Builder, "build", build)
    out = tmp_path / "c.pt"
    res = runner.invoke(app, ["compress", str(trained_tiny), "--data", "digits", "-o",
                              str(out), "--max-acc-drop", "5", *FAST])
    assert res.exit_code == 130, res.output
    assert not out.exists()
    doc = json.loads((tmp_path / "c.pareto.json").read_text())
    assert doc["stopped"] == "interrupted" and doc["candidates"] == []
    assert doc["status"] == "infeasible"
