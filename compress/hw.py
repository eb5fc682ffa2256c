"""What this CPU can do, as far as int8 and latency figures depend on it.

int8 matrix kernels on x86 multiply uint8 activations by int8 weights. Without VNNI
(AVX-512 VNNI, AVX-VNNI or AMX) ONNX Runtime does it with ``vpmaddubsw``, whose int16
accumulator saturates when both operands use the full 8-bit range: measured here on an
AVX2-only EPYC, a dynamic-int8 transformer's logits were off by 19 % of their range with
full-range weights and 2 % with 7-bit ("reduce_range") weights. ORT's quantization guide
gives the same advice, so ``reduce_range`` follows the CPU unless the user says otherwise.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag names that matter for int8 and reduced-precision kernels.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
             "amx_bf16", "fma")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa() -> list[str]:
    """The instruction sets from :data:`ISA_FLAGS` this CPU has, in that order."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def has_vnni() -> bool:
    return any(f in cpu_flags() for f in VNNI_FLAGS)


def int8_saturates() -> bool:
    """True on x86 CPUs whose int8 kernels saturate with full-range uint8 x int8 operands."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return x86 and bool(cpu_flags()) and not has_vnni()


def isa_summary() -> dict[str, bool]:
    """The instruction sets an int8 or latency figure depends on, as yes/no."""
    flags = cpu_flags()
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "vnni": has_vnni(),
            "amx": any(f.startswith("amx") for f in flags)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int | None = None) -> dict[str, Any]:
    """What a latency figure depends on: library versions, threads and the CPU."""
    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu": cpu_name(),
        **isa_summary(),
        "isa": isa(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }

