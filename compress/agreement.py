"""Output agreement without labels: how closely a compressed model reproduces a reference.

A user without a labelled validation set still sees what compression changed: the share of
inputs on which both models pick the same top-1 class, and the relative L2 error of the
outputs, on their own data's inputs or on generated ones.
"""

from __future__ import annotations

import torch

from .errors import TorchslimError
from .inputs import InputSpec, resolve
from .measure import _eval_mode, _open, _val


def agreement(reference, target, *, inputs=None, data=None, n: int = 256, seed: int = 0,
              threads: int | None = None) -> dict[str, float]:
    """Top-1 agreement (%) and relative L2 error of ``target``'s outputs against
    ``reference``'s, on the first ``n`` validation inputs of ``data`` or, without data, on
    ``n`` generated ``inputs`` (an InputSpec or a (C, H, W) shape; default: the reference's
    file metadata): images uniform in [0, 1) as images are, other inputs as InputSpec makes
    them. Either model may be an nn.Module or a LoadedModel (ONNX runs in onnxruntime).
    """
    if data is not None:
        xs = tuple(t[:n] for t in _val(data).tensors[:-1])
    else:
        meta = getattr(reference, "meta", None)
        module = getattr(reference, "model", reference)
        spec = resolve(inputs, meta.input_spec() if meta is not None else None,
                       model=module if isinstance(module, torch.nn.Module) else None)
        if spec is None:
            raise TorchslimError("agreement needs inputs: pass --data, --input-shape C,H,W or "
                                 "--input SHAPE:DTYPE")
        xs = _generated(spec, n, seed)
    threads = int(threads or torch.get_num_threads())
    ref, got = _outputs(reference, xs, threads), _outputs(target, xs, threads)
    if ref.shape != got.shape:
        raise TorchslimError(f"outputs differ in shape ({_dims(got.shape)} against the "
                             f"reference's {_dims(ref.shape)}); compare models with the same "
                             "outputs")
    count = len(xs[0])
    ref, got = ref.reshape(count, -1), got.reshape(count, -1)
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item() * 100.0
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    return {"fidelity_top1_agreement": agree, "fidelity_rel_error": rel}


@torch.inference_mode()
def fidelity(reference, target, spec, n: int = 256, seed: int = 0) -> dict[str, float]:
    """``agreement`` on ``n`` generated inputs: what `compress` reports without data."""
    return agreement(reference, target, inputs=spec, n=n, seed=seed)


def _generated(spec: InputSpec, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    if spec.image_shape is not None:  # images live in [0, 1]
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand((n, *spec.image_shape), generator=gen),)
    return spec.example(n, seed)


def _outputs(target, xs: tuple[torch.Tensor, ...], threads: int) -> torch.Tensor:
    subject, _, _ = _open(target, threads)
    count = len(xs[0])
    batch = subject.fixed_batch or count
    outs = []
    with _eval_mode(getattr(subject, "model", None)), torch.inference_mode():
        for i in range(0, count, batch):
            part = [x[i:i + batch] for x in xs]
            out = subject.forward(*(x.to(subject.dtype) if x.is_floating_point() else x
                                    for x in part))
            outs.append(torch.as_tensor(out[0] if isinstance(out, tuple | list) else out))
    return torch.cat(outs).float()


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)
