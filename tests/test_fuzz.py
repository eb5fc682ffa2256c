"""The short fuzz run: mutated model and data files through load_model / load_data end in a
load or a TorchslimError, in time, writing nothing (examples/fuzz_load.py runs the long one).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fuzz_load.py"
CASES = 300


def _fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_load", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutated_files_end_in_torchslim_error(tmp_path):
    fuzz = _fuzz()
    fuzz.prepare(tmp_path)
    results = fuzz.supervise(seed=2024, first=0, count=CASES, work=tmp_path, limit=30.0)
    assert [r["i"] for r in results] == list(range(CASES))
    bugs = [r for r in results if r["outcome"].startswith("BUG")]
    assert bugs == [], fuzz.summary(results)
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"loaded", "refused"}  # both happen: the mutations are not all fatal
    seeds = {r["seed"] for r in results}
    assert {"trained.pt", "int8.onnx", "data.npz", "torchscript.pt", "raw.pkl"} <= seeds
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []
