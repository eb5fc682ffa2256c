"""What `torchslim report` costs on a ResNet-18-sized model, part by part.

Times each piece of ``measure()`` (the whole of what ``report`` does per model) on the
registry's ResNet-18 (11.2 M parameters, small-input stem) saved as a torchslim file, and
prints a table. Latency timing dominates by design: it is ``min_run_time`` seconds per
batch size plus warm-up; every other part is overhead.

    python examples/bench_report.py [--threads 1] [--size 32] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from torchslim.compress import measure as M
from torchslim.compress.data import load_data
from torchslim.compress.io import ModelMeta, load_model, save_model
from torchslim.models.registry import create_model


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # one thread by default: on a shared 2-core box a second thread waits on stragglers
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=32, help="input H and W (3 x size x size)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    shape = (3, args.size, args.size)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=3,
                         input_size=(args.size, args.size)).eval()
    data = load_data("digits", size=(args.size, args.size), channels=3)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "resnet18.pt", ModelMeta(input_shape=shape))
        t_load, loaded = timed(lambda: load_model(path))
        net = loaded.model.eval()
        torch.set_num_threads(args.threads)  # what measure() does for all of its steps
        x1 = torch.randn(1, *shape)
        xb = torch.randn(args.batch_size, *shape)
        rows = [
            ("load_model (torchslim file)", t_load),
            ("count_params", timed(lambda: M.count_params(net))[0]),
            ("count_macs, first in a process (imports torch._dynamo)",
             timed(lambda: M.count_macs(net, x1))[0]),
            ("count_macs, again", timed(lambda: M.count_macs(net, x1))[0]),
            ("state_dict_bytes (serialise fp32)",
             timed(lambda: M.state_dict_bytes(net.state_dict()))[0]),
            ("gzip -6 of the file", timed(lambda: M.gzip_bytes([path]))[0]),
            ("latency batch 1", timed(lambda: M.measure_latency(
                net, x1, threads=args.threads))[0]),
            (f"latency batch {args.batch_size}", timed(lambda: M.measure_latency(
                net, xb, threads=args.threads))[0]),
            (f"accuracy ({len(data.val)} val images)",
             timed(lambda: M.accuracy(net, data.val, 256))[0]),
        ]
        t_bare, rec = timed(lambda: M.measure(loaded, threads=args.threads,
                                              batch_size=args.batch_size))
        t_data, _ = timed(lambda: M.measure(loaded, data=data, threads=args.threads,
                                            batch_size=args.batch_size))
    latency = rows[6][1] + rows[7][1]
    rows += [
        ("measure() without --data", t_bare),
        ("measure() with --data digits", t_data),
        ("measure() with --data minus latency timing", t_data - latency),
    ]
    print(f"ResNet-18 stand-in from the registry: {rec.params / 1e6:.2f} M params, "
          f"{rec.macs / 1e6:.1f} M MACs at {'x'.join(map(str, shape))}, "
          f"file {rec.file_bytes / 2**20:.1f} MiB, latency b1 {rec.latency_ms_median:.2f} ms "
          f"(p90 {rec.latency_ms_p90:.2f}), b{args.batch_size} "
          f"{rec.batch_latency_ms_median:.1f} ms")
    env = rec.env
    print(f"{env['cpu']}, {args.threads} thread(s), torch {env['torch']}, "
          f"min_run_time {M.DEFAULT_MIN_RUN_TIME} s per batch size\n")
    print(tabulate([(name, f"{sec:.3f}") for name, sec in rows],
                   headers=["part of report", "seconds"], tablefmt="github"))


if __name__ == "__main__":
    main()
