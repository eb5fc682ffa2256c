"""Torch-side pieces of quantization: modules saved in torchslim .pt files, and QAT fake-quant.

The modules here live under ``torchslim.`` so io's allow-list reloads them without --trust.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _per_channel_scale(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Symmetric per-output-channel scale, shaped (C_out, 1, ...) to broadcast over ``w``."""
    dims = tuple(range(1, w.dim()))
    return (w.detach().abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(1e-12)


class Int8WeightLayer(nn.Module):
    """A Linear or ConvNd whose weight is stored as int8 + per-channel fp32 scale.

    The weight is decoded to fp32 on the first forward and kept in memory (not in the file),
    so the file is ~4x smaller and later calls run the ordinary fp32 kernels.
    """

    def __init__(self, layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        w = layer.weight.detach().float()
        scale = _per_channel_scale(w)
        self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.flatten().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.ndim = 0 if isinstance(layer, nn.Linear) else w.dim() - 2
        conv = {} if self.ndim == 0 else layer
        self.stride = tuple(getattr(conv, "stride", ()))
        self.padding = getattr(conv, "padding", 0)
        self.dilation = tuple(getattr(conv, "dilation", ()))
        self.groups = int(getattr(conv, "groups", 1))
        self._decoded: torch.Tensor | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_decoded"] = None  # the decoded fp32 copy is a cache, never saved
        return state

    def weight(self) -> torch.Tensor:
        if self._decoded is None:
            shape = (-1,) + (1,) * (self.qweight.dim() - 1)
            self._decoded = self.qweight.float() * self.scale.view(shape)
        return self._decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ndim == 0:
            return F.linear(x, self.weight(), self.bias)
        fn = _CONV[self.ndim]
        return fn(x, self.weight(), self.bias, self.stride, self.padding, self.dilation,
                  self.groups)


def int8_weight_only(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Swap Linear/Conv1-3d (in place) for :class:`Int8WeightLayer`; return layers kept fp32."""
    kept: list[str] = []
    for name, m in list(model.named_modules()):
        if name and type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) and (
            getattr(m, "padding_mode", "zeros") == "zeros"
        ):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, Int8WeightLayer(m))
        elif any(True for _ in m.parameters(recurse=False)) and not _is_norm(m):
            kept.append(f"{name} ({type(m).__name__})")
    return model, kept


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)


class CastWrapper(nn.Module):
    """Weights stored in ``storage`` dtype; runs in ``compute`` dtype with fp32 in and out.

    fp16 is stored half-size but computed in fp32: torch's CPU fp16 kernels measured ~30x
    slower than fp32 here. bf16 computes natively (oneDNN AVX-512 BF16 kernels are fast).
    """

    def __init__(self, inner: nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(storage)
        self.storage = str(storage).removeprefix("torch.")
        self.compute = str(compute).removeprefix("torch.")

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        dtype = getattr(torch, self.compute)
        first = next(self.inner.parameters(), None)
        if first is not None and first.dtype != dtype:  # decode once, on the first call
            self.inner.to(dtype)
        xs = tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)  # token ids stay
        return self.inner(*xs).float()


# --- QAT: fake quantization with core torch ops (not the deprecated torch.ao) ---------------


class WeightFakeQuant(nn.Module):
    """Parametrization: per-channel symmetric int8 fake-quant with a straight-through grad.
    ``qmax`` 127, or 64 for the 7-bit weights ONNX Runtime writes with reduce_range (its
    reduced int8 range is [-64, 64]): QAT must train against the grid that ships."""

    def __init__(self, qmax: int = 127) -> None:
        super().__init__()
        self.qmax = qmax

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = _per_channel_scale(w, self.qmax).flatten()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)


class ActFakeQuant:
    """Forward pre-hook: uint8 fake-quant of a layer's input from a running min/max."""

    def __init__(self, momentum: float = 0.1) -> None:
        self.momentum = momentum
        self.lo: float | None = None
        self.hi: float | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if module.training or self.lo is None:
            lo, hi = min(float(x.detach().min()), 0.0), max(float(x.detach().max()), 0.0)
            m = 1.0 if self.lo is None else self.momentum
            self.lo = lo if self.lo is None else (1 - m) * self.lo + m * lo
            self.hi = hi if self.hi is None else (1 - m) * self.hi + m * hi
        scale = max((self.hi - self.lo) / 255.0, 1e-8)
        zero = int(round(-self.lo / scale))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), *args[1:])


def add_fake_quant(model: nn.Module, weight_qmax: int = 127) -> list:
    """Fake-quantize every Linear/Conv weight and input; returns hook handles to remove."""
    handles = []
    for m in model.modules():
        if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            parametrize.register_parametrization(m, "weight", WeightFakeQuant(weight_qmax))
            handles.append(m.register_forward_pre_hook(ActFakeQuant()))
    return handles


def remove_fake_quant(model: nn.Module, handles: list) -> nn.Module:
    """Bake the int8-snapped weights in and drop the hooks: a plain fp32 model again."""
    for h in handles:
        h.remove()
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model
