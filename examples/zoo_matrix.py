"""The third-party architecture suite as a table: every zoo family x every command.

Lays out a user's project (tests/zoo: ResNet, VGG-BN, DenseNet, SqueezeNet, ConvNeXt,
MobileNetV2/V3, EfficientNet, RegNet, ShuffleNetV2, FaultNet, an LSTM text classifier, a
Transformer encoder, a two-input model, a timm-style ViT), saves each as a full pickle from
a separate process, then runs torchslim's CLI on each one from that folder with only --trust:

    report | prune --ratio 0.3 (-o .pt, .onnx, .pt2) | swap (-o .pt, .onnx, .pt2)
    | swap --conv none --act hard | quantize --mode static / dynamic --data
    | compress --data --prune 0.3 --quantize static (.onnx) | compress --data --swap
    --prune 0.3 (.pt)

A cell is ``ok`` only when the command exited 0 *and* its output reloaded and ran (.pt with
--trust, .pt2 with --trust, .onnx with onnxruntime alone) and, for .onnx/.pt2 written by
prune/swap, matched the .pt of the same command (max abs difference printed); int8 cells give
their top-1 agreement with the fp32 model on all 600 held-out samples, compress cells the
validation top-1 of their output (pruned without fine-tuning), and "top-1 %" is `report
--data` on torchslim's validation split of the held-out samples (120); ``refused``
is a clear one-line error (exit 1/2, message listed below the table); ``FAIL`` is an
internal error, a crash, or an output that does not reload or match.

    python examples/zoo_matrix.py                      # all families (~5 min on 2 busy cores)
    python examples/zoo_matrix.py --only resnet,lstm_text --workdir /tmp/zoo
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo import FAMILIES, project  # noqa: E402  (tests/ is not a package)
from zoo.run import FAST, held_out, invoke, run_any, spec  # noqa: E402

ATOL = 1e-4  # fp32 export vs the eager .pt of the same command


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated families (default: all)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the project here")
    p.add_argument("--format", choices=("markdown", "plain"), default="markdown")
    return p.parse_args()


class Cell:
    """One command on one family: its outcome, and the one line that explains it."""

    def __init__(self, res, note: str = "", ok: bool = True):
        self.outcome = res.outcome if ok or res.outcome != "ok" else "FAIL"
        self.message = res.message if res.outcome != "ok" else note
        self.note = note

    def text(self, footnotes: list[str]) -> str:
        if self.outcome == "ok":
            return f"ok{' ' + self.note if self.note else ''}"
        if self.message not in footnotes:
            footnotes.append(self.message)
        return f"{self.outcome} [{footnotes.index(self.message) + 1}]"


def _reload(out: Path, xs, ref=None) -> tuple[bool, str]:
    """Does ``out`` load and run; with ``ref``, how far is it from the reference output?"""
    try:
        y = run_any(out, xs)
    except Exception as exc:  # any failure to reload is the finding
        return False, f"does not reload: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    if ref is None:
        return True, ""
    diff = (y - ref).abs().max().item()
    return diff <= ATOL * max(1.0, ref.abs().max().item()), f"(Δ {diff:.1e})"


def _checked(args, out: Path, xs, ref=None) -> tuple[Cell, object]:
    res = invoke(args)
    if res.outcome != "ok":
        return Cell(res), res
    fine, note = _reload(out, xs, ref)
    if not fine:
        res.stderr += f"\nerror: {out.name} {note}"
    return Cell(res, note, ok=fine), res


def run_family(root: Path, name: str) -> dict:
    """Every command on one family; returns the row's cells and numbers."""
    flags, data = project.inputs(name), project.data_file(root, name).name
    model, out = f"{name}.pt", root / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    xs = list(spec(name).with_vocab(_load(root, name)).example(2, seed=1))
    row: dict = {"hand": project.hand_count(name)}
    rep = invoke(["report", model, "--trust", *flags, "--data", data, "-f", "json", *FAST])
    row["report"] = Cell(rep)
    if rep.outcome == "ok":
        import json

        rec = json.loads(rep.stdout)[0]
        row["before"] = (rec["params"], rec["macs"])
        row["top1"] = rec["accuracy"]
    act = out / "swap-act.pt"
    cell, res = _checked(["swap", model, "--trust", *flags, "--conv", "none", "--act", "hard",
                          "-f", "json", "-o", act], act, xs)
    if cell.outcome == "ok":  # how many activations were swapped, and how many are functional
        import json

        rep = json.loads(res.stdout)
        cell.note = f"{len(rep['layers'])} swapped, {len(rep['functional'])} functional"
    row["swap act"] = cell
    for cmd, extra in (("prune", ["--ratio", "0.3", "-f", "json"]), ("swap", ["-f", "json"])):
        base = [cmd, model, "--trust", *flags, *extra]
        cell, res = _checked([*base, "-o", out / f"{cmd}.pt"], out / f"{cmd}.pt", xs)
        row[cmd] = cell
        ref = _ref(out / f"{cmd}.pt", xs) if cell.outcome == "ok" else None
        if cmd == "prune" and res.outcome == "ok":
            import json

            after = json.loads(res.stdout)[1]
            row["after"] = (after["params"], after["macs"])
        for suffix in (".onnx", ".pt2"):
            target = out / f"{cmd}{suffix}"
            row[f"{cmd}{suffix}"] = _checked([*base, "-o", target], target, xs, ref)[0]
    held, fp32 = _fp32_on_held_out(root, name)
    for mode in ("static", "dynamic"):
        target = out / f"q-{mode}.onnx"
        cell = _checked(["quantize", model, "--trust", *flags, "--mode", mode, "--data",
                         data, "--no-compare", "-o", target], target, xs)[0]
        if cell.outcome == "ok":  # top-1 agreement with fp32 on all held-out samples
            agree = (run_any(target, held).argmax(1) == fp32.argmax(1)).float().mean()
            cell.note = f"{100 * agree.item():.1f}%"
        row[mode] = cell
    for label, steps in COMPRESS.items():
        target = out / label.replace(" ", "-")
        cell = _checked(["compress", model, "--trust", *flags, "--data", data, *steps, *FAST,
                         "-o", target], target, xs)[0]
        if cell.outcome == "ok":  # the last step's validation top-1 (no fine-tuning)
            import json

            last = json.loads(target.with_name(target.stem + ".report.json").read_text())[-1]
            cell.note = f"{last['accuracy']:.1f}%"
        row[label] = cell
    return row


def _fp32_on_held_out(root: Path, name: str):
    xs, _ = held_out(root, name)
    with torch.no_grad():
        return xs, _load(root, name)(*xs)


def _load(root: Path, name: str):
    from torchslim.compress.io import load_model

    return load_model(root / f"{name}.pt", trust=True).model


def _ref(path: Path, xs):
    try:
        return run_any(path, xs)
    except Exception:  # reported by the .pt cell already
        return None


# Two pipelines: prune + int8 for every family, and swap + prune kept as a torchslim .pt
COMPRESS = {"compress pq.onnx": ["--prune", "0.3", "--quantize", "static"],
            "compress sp.pt": ["--swap", "--prune", "0.3"]}
COLUMNS = ["report", "prune", "prune.onnx", "prune.pt2", "swap", "swap.onnx", "swap.pt2",
           "swap act", "static", "dynamic", *COMPRESS]


def _num(pair, i) -> str:
    return "-" if pair is None else f"{pair[i]:,}"


def render(rows: dict[str, dict]) -> tuple[list[str], list[list[str]], list[str]]:
    footnotes: list[str] = []
    headers = ["architecture", "params", "MACs", "hand count", "top-1 %", "params pruned",
               "MACs pruned", *COLUMNS]
    body = []
    for name, row in rows.items():
        before, after = row.get("before"), row.get("after")
        body.append([
            name, _num(before, 0), _num(before, 1),
            "=" if before == row["hand"] else f"≠ {row['hand']}",
            "-" if row.get("top1") is None else f"{row['top1']:.1f}",
            _num(after, 0), _num(after, 1),
            *[row[c].text(footnotes) for c in COLUMNS],
        ])
    return headers, body, footnotes


def main() -> None:
    args = parse_args()
    names = [n for n in args.only.split(",") if n] or list(FAMILIES)
    torch.set_num_threads(1)  # tiny models: a second thread only waits
    with tempfile.TemporaryDirectory(prefix="zoo-matrix-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        start = time.perf_counter()
        project.make(root, names)
        print(f"project laid out and models saved in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        os.chdir(root)  # where the user runs torchslim, so --trust finds their modules
        rows = {}
        for name in names:
            t0 = time.perf_counter()
            rows[name] = run_family(root, name)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    from tabulate import tabulate

    headers, body, notes = render(rows)
    print(tabulate(body, headers=headers, tablefmt="github" if args.format == "markdown"
                   else "simple", disable_numparse=True))
    print()
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")


if __name__ == "__main__":
    main()
