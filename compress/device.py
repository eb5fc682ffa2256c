"""Where training runs: the --device and --amp values, checked once, and the way back to CPU.

Training may run on a GPU; measuring never does. Latency is timed on the CPU (the target
these models ship to), so every trained model comes back to the CPU, in eval mode, before
it is measured, exported, saved or handed to the next step.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TorchslimError, UsageError

DEVICES = "cpu | cuda | cuda:N | auto"
AMPS = ("off", "bf16")
_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_device(text: str) -> str:
    """Reject what is not ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a usage error)."""
    if not isinstance(text, str) or not _PATTERN.match(text):
        raise UsageError(f"--device must be {DEVICES}, got {text!r}")
    return text


def resolve_device(text: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a GPU that is not there is
    a usage error that says what is."""
    text = check_device(text)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: {_no_cuda()}; use --device cpu (or auto)")
        index = int(text.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"--device {text}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; pick one of them")
    return text


def _no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device "
            "(driver missing, or CUDA_VISIBLE_DEVICES empty)")


def check_amp(amp: str) -> str:
    if amp not in AMPS:
        raise UsageError(f"--amp must be {' | '.join(AMPS)}, got {amp!r}")
    return amp


def autocast(device: torch.device, amp: str):
    """bf16 mixed precision for the forward passes when asked; full fp32 otherwise. bf16
    keeps fp32's exponent range, so no loss scaling is needed (unlike fp16)."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def device_of(model) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a function)."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cpu")


def off_cpu(model: nn.Module) -> str | None:
    """The first non-CPU device holding any of the module's tensors, else None."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu":
            return str(t.device)
    return None


def to_cpu_eval(model: nn.Module) -> nn.Module:
    """The module (unwrapped from DistributedDataParallel) on the CPU, in eval mode."""
    model = getattr(model, "module", model) if _is_ddp(model) else model
    return model.cpu().eval()


def _is_ddp(model) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def cpu_state(state):
    """A (nested) state with every tensor copied to the CPU: a checkpoint written on a GPU
    resumes on a machine without one."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return type(state)((k, cpu_state(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_state(v) for v in state)
    return state


def out_of_memory(device: torch.device, batch_size: int) -> TorchslimError:
    """The GPU ran out of memory: say which smaller batch to try."""
    smaller = max(1, batch_size // 2)
    return TorchslimError(
        f"out of memory on {device} at batch size {batch_size}: try --batch-size {smaller} "
        "(or --amp bf16, or --device cpu)")


@dataclass(frozen=True)
class TrainDevice:
    """Where a command's training runs; the CLI's --device and --amp, checked."""

    device: str = "cpu"
    amp: str = "off"

    def __post_init__(self):
        check_device(self.device)
        check_amp(self.amp)

    @classmethod
    def parse(cls, device: str = "auto", amp: str = "off") -> TrainDevice:
        """``auto`` resolved, a missing GPU refused: before any file is read."""
        return cls(resolve_device(device), check_amp(amp))

    def train_kwargs(self) -> dict:
        """The fields TrainConfig and DistillConfig take: ``TrainConfig(**d.train_kwargs())``."""
        return {"device": self.device, "amp": self.amp}
