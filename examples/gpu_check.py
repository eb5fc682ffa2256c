"""Every torchslim command that trains, on the GPU and on the same machine's CPU, same seed.

Run by examples/gpu_check.sh on a machine with a CUDA GPU (it works without one too: the
cuda rows are then skipped). For each device it runs train, prune (fine-tune), swap (refit
+ fine-tune), distill, compress with a recipe, compress --max-acc-drop (short time budget)
and, on cuda, distill under torchrun with NCCL; then reloads every output in a process that
sees no GPU (CUDA_VISIBLE_DEVICES=) and reports its validation top-1 there. It prints one
table: command x device, exit code, wall seconds, seconds per epoch (from the history each
file records) and top-1.

    python examples/gpu_check.py --out OUT [--epochs 2] [--budget 1m] [--quick]

--quick (or GPU_CHECK_QUICK=1) trains tiny models (resnet_tiny, mobilenet_tiny) at the data's
own 8x8 size, 300 images where a command can limit them: a check that the script runs, not a
measurement. Without it: PDModel at 1x60x120 (pd_light as the student).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

NOTE = re.compile(r"trained on (\S+): ([0-9.]+) s per epoch")
DEVICES = ("cuda", "cpu")  # the GPU first: if time runs short, the CPU comparison is lost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--epochs", type=int, default=int(os.environ.get("GPU_CHECK_EPOCHS", 2)))
    ap.add_argument("--budget", default=os.environ.get("GPU_CHECK_BUDGET", "45s"))
    ap.add_argument("--limit", type=float, default=float(os.environ.get("GPU_CHECK_LIMIT", 420)),
                    help="Seconds for everything; steps that would start later are skipped.")
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("GPU_CHECK_QUICK", "") not in ("", "0"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    log = open(a.out / "gpu.log", "a", buffering=1)
    start = time.perf_counter()
    env_info(log)
    rows = []
    for device in DEVICES:
        if device == "cuda" and not cuda_available():
            say(log, "no CUDA device: the cuda rows are skipped")
            continue
        work = a.work / device
        shutil.rmtree(work, ignore_errors=True)  # a rerun starts afresh (the search resumes)
        work.mkdir(parents=True)
        for name, args, output in steps(a, device, work):
            if time.perf_counter() - start > a.limit:
                rows.append({"command": name, "device": device, "rc": "skipped"})
                continue
            left = a.limit - (time.perf_counter() - start)
            rows.append(run_step(log, name, device, args, output, min(300, left + 60)))
    if not a.quick and cuda_available() and time.perf_counter() - start < a.limit - 60:
        rows.append(gpu_tests(log))
    table = render(rows)
    say(log, table)
    (a.out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    say(log, f"total {time.perf_counter() - start:.0f} s")
    print(table)
    return 0 if all(r["rc"] in (0, "skipped") for r in rows) else 1


def steps(a, device: str, w: Path) -> list[tuple[str, list[str], Path | None]]:
    e = str(a.epochs)
    data = ["--data", "digits", "--seed", "0"]
    size = [] if a.quick else ["--image-size", "60,120"]
    teacher, student = ("resnet_tiny", "mobilenet_tiny") if a.quick else ("pd", "pd_light")
    limit = ["--train-limit", "300"] if a.quick else []
    dev = ["--device", device]
    recipe = w / "recipe.toml"
    recipe.write_text(
        '[[steps]]\nmethod = "swap"\nconv = "depthwise-separable"\n\n'
        '[[steps]]\nmethod = "prune"\nratio = 0.4\n\n'
        f'[[steps]]\nmethod = "distill"\nepochs = {a.epochs}\n\n'
        '[[steps]]\nmethod = "quantize"\nmode = "static"\n')
    pd = w / "pd.pt"
    out = [
        ("train", ["train", teacher, *data, *size, *limit, "--epochs", e, *dev, "-o", pd], pd),
        ("prune", ["prune", pd, "--target-macs", "0.5", *data, "--epochs", e, *dev,
                   "-o", w / "pruned.pt"], w / "pruned.pt"),
        ("swap", ["swap", pd, *data, "--epochs", e, *dev, "-o", w / "swapped.pt"],
         w / "swapped.pt"),
        ("distill", ["distill", "--teacher", pd, "--student", student, *data, *limit,
                     "--epochs", e, *dev, "-o", w / "light.pt"], w / "light.pt"),
        ("compress --recipe", ["compress", pd, *data, *limit, "--recipe", recipe, *dev,
                               "-o", w / "slim.onnx"], w / "slim.onnx"),
    ]
    # GPU only: the search stops on a time budget, so its CPU run is no same-work
    # comparison; qat is checked to finish on CUDA and reload on the CPU
    gpu_only = [
        ("quantize --mode qat", ["quantize", pd, "--mode", "qat", *data, "--qat-epochs", e,
                                 *dev, "--no-compare", "-o", w / "qat.onnx"], w / "qat.onnx"),
        ("compress --max-acc-drop", ["compress", pd, *data, *limit, "--max-acc-drop", "1",
                                     "--swap", "--prune", "0.5", "--quantize", "static",
                                     "--distill", "--epochs", e, "--time-budget", a.budget,
                                     *dev, "--workdir", w / "search", "-o", w / "goal.onnx"],
         w / "goal.onnx"),
    ]
    if device == "cuda" or a.quick:  # --quick runs them on the CPU too, to check the script
        out += gpu_only
        out.insert(1, ("train --amp bf16", ["train", teacher, *data, *size, *limit, "--epochs", e,
                                            *dev, "--amp", "bf16", "-o", w / "pd-bf16.pt"],
                       w / "pd-bf16.pt"))
        out.append((f"torchrun x1 distill ({'nccl' if device == 'cuda' else 'gloo'})",
                    ["torchrun", "distill", "--teacher", pd, "--student", student, *data,
                     *limit, "--epochs", e, *dev, "-o", w / "light-ddp.pt"], w / "light-ddp.pt"))
    return [(n, [str(x) for x in args], o) for n, args, o in out]


def run_step(log, name, device, args, output: Path | None, timeout: float) -> dict:
    for stale in ([output, output.with_suffix(".fp32.pt")] if output else []):
        stale.unlink(missing_ok=True)
    if args[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "-m", "torchslim", *args[1:]]
    else:
        cmd = [sys.executable, "-m", "torchslim", *args, "--force"]
    row = {"command": name, "device": device}
    row["rc"], row["wall_s"] = run(log, cmd, timeout=timeout)
    if row["rc"] == 0 and output is not None:
        row.update(reload_on_cpu(log, output))
        row["s_per_epoch"] = epoch_seconds(output)
    return row


def run(log, cmd: list[str], env=None, timeout: float = 300) -> tuple[int, float]:
    say(log, f"$ {shlex.join(cmd)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=timeout)
        rc, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else ""
    wall = time.perf_counter() - t0
    log.write(text)
    say(log, f"-> rc {rc} in {wall:.1f} s")
    return rc, round(wall, 1)


def reload_on_cpu(log, output: Path) -> dict:
    """`torchslim report` in a process that sees no GPU: the file loads and runs there."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torchslim", "report", str(output), "--data", "digits",
           "-f", "json", "--threads", "4", "--min-time", "0.05"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    log.write(f"$ CUDA_VISIBLE_DEVICES= {shlex.join(cmd)}\n{proc.stderr}")
    say(log, f"-> rc {proc.returncode} in {time.perf_counter() - t0:.1f} s")
    if proc.returncode != 0:
        return {"cpu_report_rc": proc.returncode}
    row = json.loads(proc.stdout)[0]
    return {"cpu_report_rc": 0, "top1": row.get("accuracy"), "file_bytes": row.get("file_bytes")}


def epoch_seconds(output: Path) -> str | None:
    """The "trained on D: S s per epoch" note of the last step in the file's history (or in
    the fp32 file's beside an int8 output); earlier steps are the input's training."""
    from torchslim.compress.io import load_model

    path = output.with_suffix(".fp32.pt") if output.suffix == ".onnx" else output
    if not path.exists():
        return None
    history = load_model(path, trust=False).meta.history
    notes = history[-1].get("notes", []) if history else []
    found = [NOTE.search(n) for n in notes]
    found = [m for m in found if m]
    return f"{found[-1].group(2)} ({found[-1].group(1)})" if found else None


def gpu_tests(log) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        say(log, "pytest not installed: the gpu-marked tests are not run")
        return {"command": "pytest -m gpu", "device": "cuda", "rc": "skipped"}
    rc, wall = run(log, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                         "no:cacheprovider", "tests/test_device.py"], timeout=180)
    return {"command": "pytest -m gpu", "device": "cuda", "rc": rc, "wall_s": wall}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def env_info(log) -> None:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    say(log, f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, "
             f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")


def render(rows: list[dict]) -> str:
    cols = ("command", "device", "rc", "wall_s", "s_per_epoch", "top1", "cpu_report_rc")
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def say(log, text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    log.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
