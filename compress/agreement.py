"""Output agreement without labels: how closely a compressed model reproduces a reference.

A user without a labelled validation set still sees what compression changed: the share of
inputs on which both models pick the same top-1 class, and the relative L2 error of the
outputs, on their own data's inputs or on generated ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import TorchslimError
from .measure import _eval_mode, _open, _val


def agreement(reference, target, *, input_shape: Sequence[int] | None = None, data=None,
              n: int = 256, seed: int = 0, threads: int | None = None) -> dict[str, float]:
    """Top-1 agreement (%) and relative L2 error of ``target``'s outputs against
    ``reference``'s, on the first ``n`` validation inputs of ``data`` or, without data, on
    ``n`` inputs drawn uniformly from [0, 1) (images' range) with ``seed``.

    Either model may be an nn.Module or a LoadedModel (ONNX files run in onnxruntime).
    """
    if data is not None:
        x = _val(data)[:n][0]
    elif input_shape:
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand((n, *input_shape), generator=gen)
    else:
        raise TorchslimError("agreement needs inputs: pass --data or --input-shape C,H,W")
    threads = int(threads or torch.get_num_threads())
    ref, got = _outputs(reference, x, threads), _outputs(target, x, threads)
    if ref.shape != got.shape:
        raise TorchslimError(f"outputs differ in shape ({_dims(got.shape)} against the "
                             f"reference's {_dims(ref.shape)}); compare models with the same "
                             "outputs")
    ref, got = ref.reshape(len(x), -1), got.reshape(len(x), -1)
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item() * 100.0
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    return {"fidelity_top1_agreement": agree, "fidelity_rel_error": rel}


@torch.inference_mode()
def fidelity(reference, target, shape, n: int = 256, seed: int = 0) -> dict[str, float]:
    """``agreement`` on ``n`` generated inputs: what `compress` reports without data."""
    return agreement(reference, target, input_shape=shape, n=n, seed=seed)


def _outputs(target, x: torch.Tensor, threads: int) -> torch.Tensor:
    subject, _, _ = _open(target, threads)
    batch = subject.fixed_batch or len(x)
    outs = []
    with _eval_mode(getattr(subject, "model", None)), torch.inference_mode():
        for i in range(0, len(x), batch):
            out = subject.forward(x[i:i + batch].to(subject.dtype))
            outs.append(torch.as_tensor(out[0] if isinstance(out, tuple | list) else out))
    return torch.cat(outs).float()


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)
