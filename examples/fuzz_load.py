"""Fuzz torchslim's loaders with mutated files; print what happened and every finding.

Each case takes one valid file torchslim reads (torchslim .pt of several kinds, a state_dict,
a pickled module, a distill checkpoint, TorchScript, int8 ONNX, .npz and .pt data), mutates
it (truncation, bit flips, overwritten bytes, spliced chunks of other files, and zip-aware
mutations that re-zip with valid CRCs: a mutated record, swapped records, changed pickle
integers, ONNX tensors with other dims or external data) and passes it to ``load_model`` or
``load_data``. A case passes when it loads or raises ``TorchslimError`` within the time
limit, writes no file and leaves its input as it was. Anything else is a finding: another
exception, a hang, a crash of the process (a worker process runs the cases, so a segfault
or a hang is recorded and the run goes on), or a written file.

    python examples/fuzz_load.py --cases 20000 --seed 0          # the long run
    python examples/fuzz_load.py --cases 1 --seed 0 --first 4711 --save /tmp/case  # replay

A seeded loop rather than hypothesis: every case is reproducible from (seed, index) alone,
no example database is written (the "no file written" check would trip on it), and a
supervisor process can kill a case that hangs inside C code, which an in-process property
test cannot.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickletools
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODEL_SEEDS = ["trained.pt", "pruned.pt", "swapped.pt", "weight-only.pt", "bf16.pt",
               "lstm_tiny.pt", "transformer_tiny.pt", "plain_module.pt", "state_dict.pt",
               "distill.ckpt", "int8.onnx"]
DATA_SEEDS = ["data.npz", "data.pt"]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**40]


# --- seeds ----------------------------------------------------------------------------


def make_seeds(work: Path, trusted_torchscript: bool = False) -> dict[str, bytes]:
    """The valid files every mutation starts from, plus TorchScript and a raw pickle."""
    import pickle

    import torch

    from torchslim.compress.io import load_model

    seeds = {n: (FIXTURES / n).read_bytes() for n in MODEL_SEEDS + DATA_SEEDS}
    model = load_model(FIXTURES / "trained.pt").model
    ts = work / "seed.ts.pt"
    torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).save(str(ts))
    seeds["torchscript.pt"] = ts.read_bytes()
    if trusted_torchscript:
        seeds["torchscript-trusted.pt"] = seeds["torchscript.pt"]
    ts.unlink()
    seeds["raw.pkl"] = pickle.dumps({"x": [1.0, 2.0], "y": (1, 2)}, protocol=2)
    return seeds


# --- mutations ------------------------------------------------------------------------


def truncate(data: bytes, rng: random.Random, _others) -> bytes:
    return data[: rng.randrange(len(data))]


def flip_bits(data: bytes, rng: random.Random, _others) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def overwrite(data: bytes, rng: random.Random, _others) -> bytes:
    buf = bytearray(data)
    value = rng.choice(INTERESTING)
    width = rng.choice([1, 2, 4, 8])
    i = rng.randrange(max(1, len(buf) - width))
    buf[i:i + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf)


def splice(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    other = rng.choice(others)
    a = rng.randrange(len(other))
    chunk = other[a:a + rng.randrange(1, 4096)]
    i = rng.randrange(len(data))
    end = i + (len(chunk) if rng.random() < 0.5 else 0)  # replace or insert
    return data[:i] + chunk + data[end:]


BYTE_MUTATORS = [truncate, flip_bits, overwrite, splice]


def _records(data: bytes) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return [(i.filename, zf.read(i)) for i in zf.infolist()]
    except Exception:  # not a zip: zip-aware mutations fall back to byte mutations
        return None


def _zip(records: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, body in records:
            zf.writestr(name, body)
    return out.getvalue()


def zip_record(data: bytes, rng: random.Random, others) -> bytes:
    recs = _records(data)
    if not recs:
        return flip_bits(data, rng, others)
    i = rng.randrange(len(recs))
    name, body = recs[i]
    if body:
        recs[i] = (name, rng.choice(BYTE_MUTATORS)(body, rng, others))
    return _zip(recs)


def zip_swap(data: bytes, rng: random.Random, others) -> bytes:
    recs = _records(data)
    if not recs or len(recs) < 2:
        return splice(data, rng, others)
    i, j = rng.sample(range(len(recs)), 2)
    recs[i], recs[j] = (recs[i][0], recs[j][1]), (recs[j][0], recs[i][1])
    return _zip(recs)


def pickle_ints(data: bytes, rng: random.Random, others) -> bytes:
    """Re-zip with some integers of data.pkl changed: sizes, strides, numels, offsets."""
    recs = _records(data)
    idx = next((k for k, (n, _) in enumerate(recs or []) if n.endswith("data.pkl")), None)
    if idx is None:
        return overwrite(data, rng, others)
    name, body = recs[idx]
    try:
        spots = [(pos, op.name) for op, _, pos in pickletools.genops(body)
                 if op.name in ("BININT", "BININT1", "BININT2")]
    except Exception:
        spots = []
    buf = bytearray(body)
    for pos, op in rng.sample(spots, min(len(spots), rng.choice([1, 1, 2, 3]))):
        width = {"BININT": 4, "BININT1": 1, "BININT2": 2}[op]
        value = rng.choice(INTERESTING + [rng.randrange(1 << (8 * width))])
        buf[pos + 1:pos + 1 + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    recs[idx] = (name, bytes(buf))
    return _zip(recs)


def onnx_tensor(data: bytes, rng: random.Random, others) -> bytes:
    """An initializer with other dims, or its data moved to an external file."""
    try:
        import onnx

        proto = onnx.load_from_string(data)
        inits = list(proto.graph.initializer)
    except Exception:
        return overwrite(data, rng, others)
    if not inits:
        return overwrite(data, rng, others)
    t = rng.choice(inits)
    if rng.random() < 0.5 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice(INTERESTING[1:])
    else:
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", rng.choice(["../x.bin", "/etc/hostname", "w.bin",
                                                     "case.onnx"])),
                           ("offset", str(rng.choice([0, 8, 2**40]))),
                           ("length", str(rng.choice([4, 64, 2**33])))):
            e = t.external_data.add()
            e.key, e.value = key, value
    return proto.SerializeToString()


MUTATORS = {f.__name__: f for f in BYTE_MUTATORS + [zip_record, zip_swap, pickle_ints,
                                                     onnx_tensor]}


# --- one case -------------------------------------------------------------------------


def case_plan(seed: int, index: int, seeds: dict[str, bytes]) -> tuple[str, str, bytes]:
    """(seed file, mutator, mutated bytes) of case ``index``: a pure function of both."""
    rng = random.Random(seed * 1_000_003 + index)
    name = rng.choice(sorted(seeds))
    mutator = rng.choice(sorted(MUTATORS))
    if mutator == "onnx_tensor" and not name.endswith(".onnx"):
        mutator = "pickle_ints" if name.endswith((".pt", ".ckpt")) else "overwrite"
    others = [v for k, v in sorted(seeds.items()) if k != name]
    return name, mutator, MUTATORS[mutator](seeds[name], rng, others)


def _target(name: str):
    from torchslim.cli.distill import _load_resume
    from torchslim.compress.data import load_data
    from torchslim.compress.io import load_model

    if name in DATA_SEEDS:
        return lambda p: load_data(str(p))
    if name == "state_dict.pt":
        return lambda p: load_model(p, arch="resnet_tiny", in_channels=1, input_size=(8, 8))
    if name == "distill.ckpt":
        return _load_resume  # what `distill --resume` reads
    if name == "torchscript-trusted.pt":  # the --trust path: torch.jit.load's own reader
        return lambda p: load_model(p, trust=True)
    return load_model


def run_case(seed: int, index: int, seeds: dict[str, bytes], work: Path) -> dict:
    from torchslim.compress.errors import TorchslimError

    name, mutator, data = case_plan(seed, index, seeds)
    suffix = {"data.npz": ".npz", "int8.onnx": ".onnx"}.get(name, ".pt")
    case_dir = work / "case"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir()
    path = case_dir / f"case{suffix}"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        _target(name)(path)
        outcome = "loaded"
    except TorchslimError:
        outcome = "refused"
    except Exception as exc:  # the findings this fuzzer looks for
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        outcome = f"BUG {type(exc).__name__}: {first}"
    seconds = time.perf_counter() - start
    if sorted(os.listdir(case_dir)) != [path.name] or os.listdir(tempfile.gettempdir()):
        outcome = "BUG wrote a file"
    elif hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(data).digest():
        outcome = "BUG changed its input"
    return {"i": index, "seed": name, "mutator": mutator, "outcome": outcome,
            "seconds": round(seconds, 4), "bytes": len(data)}


def worker(seed: int, first: int, count: int, work: Path) -> None:
    """Run cases and print one JSON line each; the supervisor watches the clock."""
    import torch

    torch.set_num_threads(1)
    seeds = json_seeds(work)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    tempfile.tempdir = str(tmp)
    for i in range(first, first + count):
        print(json.dumps(run_case(seed, i, seeds, work)), flush=True)


def json_seeds(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((work / "seeds").iterdir())}


# --- the supervisor -------------------------------------------------------------------


def supervise(seed: int, first: int, count: int, work: Path, limit: float,
              log=sys.stderr) -> list[dict]:
    """Run cases [first, first + count) in worker processes; a case that exceeds ``limit``
    seconds is a hang and one that kills its worker is a crash; both restart the worker."""
    results: list[dict] = []
    nxt = first
    while nxt < first + count:
        proc, lines = _start_worker(seed, nxt, first + count - nxt, work)
        timeout = limit + 60  # the first case pays for the imports
        while nxt < first + count:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                line = "hang"
            if line not in ("hang", "eof"):
                results.append(json.loads(line))
                nxt, timeout = nxt + 1, limit
                if len(results) % 1000 == 0:
                    print(f"{len(results)} cases", file=log, flush=True)
                continue
            proc.kill()
            code = proc.wait()
            name, mutator, data = case_plan(seed, nxt, json_seeds(work))
            what = "BUG hang" if line == "hang" else f"BUG crash (exit {code})"
            results.append({"i": nxt, "seed": name, "mutator": mutator, "outcome": what,
                            "seconds": limit, "bytes": len(data)})
            nxt += 1
            break
        proc.wait()
    return results


def _start_worker(seed: int, first: int, count: int, work: Path):
    cmd = [sys.executable, __file__, "--worker", "--seed", str(seed), "--first", str(first),
           "--cases", str(count), "--work", str(work)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("eof")

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def prepare(work: Path, trusted_torchscript: bool = False) -> None:
    (work / "seeds").mkdir(parents=True, exist_ok=True)
    for name, data in make_seeds(work, trusted_torchscript).items():
        (work / "seeds" / name).write_bytes(data)


def summary(results: list[dict]) -> str:
    counts = Counter((r["seed"], r["outcome"] if not r["outcome"].startswith("BUG") else "BUG")
                     for r in results)
    seeds = sorted({r["seed"] for r in results})
    lines = [f"{'seed file':<22}{'loaded':>8}{'refused':>9}{'BUG':>6}"]
    for s in seeds:
        lines.append(f"{s:<22}{counts[(s, 'loaded')]:>8}{counts[(s, 'refused')]:>9}"
                     f"{counts[(s, 'BUG')]:>6}")
    slow = max(results, key=lambda r: r["seconds"])
    lines.append(f"{len(results)} cases; slowest {slow['seconds']:.3f} s (case {slow['i']}, "
                 f"{slow['seed']}, {slow['mutator']})")
    bugs = [r for r in results if r["outcome"].startswith("BUG")]
    lines += [f"finding: case {r['i']} {r['seed']} {r['mutator']}: {r['outcome']}"
              for r in bugs]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=0, help="index of the first case")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="write case --first's file here")
    ap.add_argument("--trusted-torchscript", action="store_true",
                    help="also fuzz torch.jit.load behind --trust (torch's reader, not ours)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.seed, args.first, args.cases, args.work)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="torchslim-fuzz-"))
    prepare(work, args.trusted_torchscript)
    if args.save:
        name, mutator, data = case_plan(args.seed, args.first, json_seeds(work))
        args.save.write_bytes(data)
        print(f"case {args.first}: {name} after {mutator} -> {args.save}")
        return
    start = time.perf_counter()
    results = supervise(args.seed, args.first, args.cases, work, args.time_limit)
    print(summary(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if any(r["outcome"].startswith("BUG") for r in results) else 0)


if __name__ == "__main__":
    main()
