"""What a model takes as input: one or several tensors, each with a shape and a dtype.

Image models take one float (B, C, H, W) tensor, and ``--input-shape C,H,W`` says so. Other
models take token ids (int64), sequences, or several tensors; ``--input 1,20:int64``
(repeatable, in ``forward``'s order) states each one with its batch dimension first. Every
place that runs a model (MACs, latency, ONNX export, calibration, pruning's tracing) builds
its example inputs from one :class:`InputSpec`, so a model is always called the same way:
``model(*inputs)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16,
    "half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
SYNTAX = "SHAPE[:DTYPE[:HIGH]], batch first, e.g. 1,20:int64 or 1,3,32,32"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor. ``shape`` starts with the batch dimension (1 in examples)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    # Integer inputs are generated in [0, high): token ids must stay inside the vocabulary.
    high: int | None = None

    def __post_init__(self) -> None:
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise UsageError(f"input shape must be positive integers, got {self.shape}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown input dtype {self.dtype!r}; use one of "
                             "float32, float16, bfloat16, int64, int32, uint8, bool")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", dtype_name(DTYPES[self.dtype]))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def example(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        shape = (batch, *self.sample_shape)
        if self.is_float:
            return torch.randn(shape, generator=gen).to(self.torch_dtype)
        if self.torch_dtype == torch.bool:
            return torch.rand(shape, generator=gen) < 0.5
        return torch.randint(0, self.high or 2, shape, generator=gen).to(self.torch_dtype)

    def text(self) -> str:
        out = ",".join(map(str, self.shape)) + f":{self.dtype}"
        return out + (f":{self.high}" if self.high else "")


@dataclass(frozen=True)
class InputSpec:
    """The inputs of ``forward``, in order."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise UsageError("a model needs at least one input")
        batches = {t.shape[0] for t in self.tensors}
        if len(batches) > 1:
            raise UsageError(f"every --input must have the same batch size, got {sorted(batches)}")

    # -- building --------------------------------------------------------------------------
    @classmethod
    def image(cls, sample_shape: Sequence[int]) -> InputSpec:
        """One float tensor of (1, *sample_shape): what ``--input-shape C,H,W`` means."""
        return cls((TensorSpec((1, *sample_shape)),))

    @classmethod
    def parse(cls, texts: Iterable[str]) -> InputSpec:
        return cls(tuple(parse_tensor(t) for t in texts))

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> InputSpec:
        """The spec of a batch of real samples (the batch dimension becomes 1)."""
        specs = []
        for t in tensors:
            high = None
            if not t.dtype.is_floating_point and t.dtype != torch.bool and t.numel():
                high = int(t.max()) + 1
            specs.append(TensorSpec((1, *t.shape[1:]), dtype_name(t.dtype), high))
        return cls(tuple(specs))

    @classmethod
    def from_list(cls, items: list[dict] | None) -> InputSpec | None:
        if not items:
            return None
        return cls(tuple(TensorSpec(tuple(d["shape"]), d.get("dtype", "float32"),
                                    d.get("high")) for d in items))

    def to_list(self) -> list[dict]:
        return [{"shape": list(t.shape), "dtype": t.dtype, "high": t.high}
                for t in self.tensors]

    # -- using -----------------------------------------------------------------------------
    def example(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Deterministic generated inputs: floats ~ N(0, 1), integers in [0, high)."""
        gen = torch.Generator().manual_seed(seed)
        return tuple(t.example(batch, gen) for t in self.tensors)

    def with_vocab(self, model: nn.Module) -> InputSpec:
        """Integer inputs without a bound get the smallest embedding table's size, so
        generated token ids are valid indices for every embedding in the model."""
        tables = [m.num_embeddings for m in model.modules()
                  if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
        if not tables:
            return self
        vocab = min(tables)
        return InputSpec(tuple(
            t if t.is_float or t.high else TensorSpec(t.shape, t.dtype, vocab)
            for t in self.tensors))

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """(C, H, W) for a single float image input, else None."""
        if len(self.tensors) == 1 and self.tensors[0].is_float and len(self.tensors[0].shape) == 4:
            return self.tensors[0].sample_shape
        return None

    @property
    def single_shape(self) -> tuple[int, ...] | None:
        """The one input's sample shape (no batch), or None for several inputs."""
        return self.tensors[0].sample_shape if len(self.tensors) == 1 else None

    def describe(self) -> str:
        """``1x3x32x32`` for float32 inputs, ``1x20 int64`` otherwise; comma-separated."""
        return ", ".join("x".join(map(str, t.shape)) + ("" if t.dtype == "float32" else
                                                        f" {t.dtype}") for t in self.tensors)

    def texts(self) -> list[str]:
        return [t.text() for t in self.tensors]


def parse_tensor(text: str) -> TensorSpec:
    """``1,20:int64`` / ``1x3x32x32`` / ``1,20:int64:1000`` -> TensorSpec."""
    parts = text.strip().split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"--input {text!r} is not {SYNTAX}")
    try:
        shape = tuple(int(p) for p in parts[0].replace("x", ",").split(","))
        high = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise UsageError(f"--input {text!r} is not {SYNTAX}") from None
    dtype = parts[1] if len(parts) > 1 and parts[1] else "float32"
    if high is not None and high < 1:
        raise UsageError(f"--input {text!r}: HIGH (exclusive bound of integer values) must be >= 1")
    try:
        return TensorSpec(shape, dtype, high)
    except UsageError as exc:
        raise UsageError(f"--input {text!r}: {exc}") from None


def as_spec(value) -> InputSpec | None:
    """An InputSpec as it is, a (C, H, W)-style sample shape as one float input, or None."""
    if value is None or isinstance(value, InputSpec):
        return value
    return InputSpec.image(tuple(value))


def resolve(*candidates, model: nn.Module | None = None) -> InputSpec | None:
    """The first spec given (explicit > file metadata > data), with token-id bounds taken
    from the model's embeddings where the spec has none."""
    spec = next((as_spec(c) for c in candidates if c is not None), None)
    if spec is not None and isinstance(model, nn.Module):
        spec = spec.with_vocab(model)
    return spec


def as_tuple(inputs) -> tuple:
    """A tensor or a sequence of tensors -> a tuple, the form models are called with."""
    return tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)


def call(model, inputs):
    """``model(*inputs)``: the one way torchslim runs a model."""
    return model(*as_tuple(inputs))


def call_hooked(model, inputs, hooks) -> None:
    """One no-grad, eval-mode pass of ``model`` with ``hooks`` (handles) installed; they are
    removed afterwards, even if the pass fails."""
    try:
        with torch.no_grad():
            call(model.eval(), inputs)
    finally:
        for h in hooks:
            h.remove()


def batch_inputs(batch: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A (x..., y) batch from a data split -> ((x...), y)."""
    *xs, y = batch
    return tuple(xs), y
