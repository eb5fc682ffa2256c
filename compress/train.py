"""The training loop every method shares: train, fine-tune, distil, recover.

Progress goes through callbacks so the library never prints; the CLI plugs in rich bars.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .device import (
    autocast,
    check_amp,
    check_device,
    cpu_state,
    device_of,
    out_of_memory,
    resolve_device,
)
from .errors import UsageError
from .inputs import call


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 3e-3  # AdamW with cosine decay; 3e-3 suits the small CNNs we fine-tune
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True  # small random shifts: the cheap regulariser for tiny image sets
    hflip: bool = False  # random mirror flips; off: PD images are not mirror-invariant
    temperature: float = 4.0  # KD temperature, used only when a teacher is given
    alpha: float = 0.7  # weight of the soft (teacher) loss vs the hard label loss
    device: str = "cpu"  # cpu | cuda | cuda:N | auto; the trained model comes back on the CPU
    amp: str = "off"  # "bf16": torch.autocast on the forward passes (fp32 weights and steps)

    def __post_init__(self):
        check_device(self.device)
        check_amp(self.amp)
        if self.epochs < 0:
            raise UsageError(f"--epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    val_top1: float
    val_top5: float | None
    lr: float
    val_loss: float = float("nan")  # cross-entropy on validation: breaks top-1 ties
    seconds: float = float("nan")  # wall time of the epoch's training steps and validation


@dataclass
class FitResult:
    best_top1: float
    best_epoch: int
    best_loss: float = float("inf")
    epochs: list[EpochStats] = field(default_factory=list)
    device: str = "cpu"  # where it trained (``auto`` resolved)

    def timing_note(self) -> str | None:
        """"trained on cuda: 1.23 s per epoch (median of 5)" for a model's history."""
        secs = [e.seconds for e in self.epochs if not math.isnan(e.seconds)]
        if not secs:
            return None
        return (f"trained on {self.device}: {statistics.median(secs):.2f} s per epoch "
                f"(median of {len(secs)})")


@dataclass
class Callbacks:
    """Hooks for progress display; every one is optional."""

    on_start: Callable[[int, int], None] | None = None  # (epochs, steps per epoch)
    on_step: Callable[[int, int, float], None] | None = None  # (epoch, step, loss)
    on_epoch: Callable[[EpochStats], None] | None = None
    on_checkpoint: Callable[[dict], None] | None = None  # resumable state after each epoch


def kd_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float):
    """Hinton et al. (2015): alpha * T^2 * KL(soft teacher || soft student) + (1-alpha) * CE."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def augment_batch(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` of each side, zero padded; no flips, since
    sensor images (and digits) are not mirror-invariant."""
    b, _, h, w = x.shape
    dy = max(1, int(round(h * max_shift)))
    dx = max(1, int(round(w * max_shift)))
    padded = F.pad(x, (dx, dx, dy, dy))
    oy = torch.randint(0, 2 * dy + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * dx + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    bidx = torch.arange(b)[:, None, None, None]
    cidx = torch.arange(x.shape[1])[None, :, None, None]
    # the offsets come from the CPU generator, so a GPU run shifts exactly like a CPU run
    idx = [t.to(x.device) for t in (bidx, cidx, rows, cols)]
    return padded[idx[0], idx[1], idx[2], idx[3]]


def evaluate(model_or_fn, dataset: TensorDataset, batch_size: int = 256):
    """Top-1 and top-5 accuracy in percent; top-5 is None with five classes or fewer."""
    return scores(model_or_fn, dataset, batch_size)[:2]


@torch.inference_mode()
def scores(model_or_fn, dataset: TensorDataset, batch_size: int = 256):
    """(top-1 %, top-5 % or None, mean cross-entropy) in one pass."""
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    num_classes = None
    device = device_of(model_or_fn)
    loader = DataLoader(dataset, batch_size=batch_size, pin_memory=device.type == "cuda")
    for *xs, y in loader:
        xs = [x.to(device, non_blocking=True) for x in xs]
        logits = torch.as_tensor(call(model_or_fn, xs)).float().cpu()
        num_classes = logits.shape[1]
        k = min(5, num_classes)
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        if not math.isnan(loss_sum) and int(y.max()) < num_classes:
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        else:  # labels the model has no output for: top-1 still counts them as misses
            loss_sum = float("nan")
        total += len(y)
    top1 = 100.0 * correct1 / max(total, 1)
    top5 = 100.0 * correct5 / max(total, 1) if num_classes and num_classes > 5 else None
    return top1, top5, loss_sum / max(total, 1)


def fit(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_params: list[nn.Parameter] | None = None,
    callbacks: Callbacks | None = None,
    sampler=None,
    resume: dict | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train``, validate each epoch, restore the best weights.

    ``teacher`` switches the loss to :func:`kd_loss`; ``extra_loss(x, logits)`` is added to
    it (feature distillation); ``extra_params`` are optimised too (e.g. adapters).
    ``resume`` is a state given to ``callbacks.on_checkpoint``: training continues after
    its epoch exactly as if it had not stopped.
    """
    cb = callbacks or Callbacks()
    device = torch.device(resolve_device(cfg.device))
    teacher_home = device_of(teacher) if teacher is not None else None
    try:
        return _fit(model, data, cfg, device, teacher, extra_loss, extra_params, cb, sampler,
                    resume)
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(device, cfg.batch_size) from exc
    finally:
        # Measuring, exporting and saving happen on the CPU: whatever happened, the model
        # (and the teacher, which is often measured next) go back there.
        _unwrap(model).cpu().eval()
        if teacher is not None:
            teacher.to(teacher_home).eval()


def _fit(model, data, cfg: TrainConfig, device, teacher, extra_loss, extra_params, cb,
         sampler, resume) -> FitResult:
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        drop_last=len(data.train) > cfg.batch_size,
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
    )
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = max(1, cfg.epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    best = FitResult(best_top1=-1.0, best_epoch=0, device=str(device))
    best_state = copy.deepcopy(model.state_dict())
    start = 1
    if resume is not None:
        best_state = _restore(resume, model, opt, sched, gen, best)
        start = resume["epoch"] + 1
    if cb.on_start:
        cb.on_start(cfg.epochs, len(loader))
    for epoch in range(start, cfg.epochs + 1):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        began = time.perf_counter()
        loss = _train_epoch(model, loader, opt, sched, cfg, teacher, extra_loss, gen, cb, epoch)
        top1, top5, val_loss = scores(model, data.val)
        stats = EpochStats(epoch, loss, top1, top5, sched.get_last_lr()[0], val_loss,
                           time.perf_counter() - began)
        best.epochs.append(stats)
        # Best top-1; a tie goes to the lower validation loss. A few hundred validation
        # images tie often, and keeping the first of equals shipped under-trained weights
        # (pruned PDModel: epoch 1 of 12 kept, 2.2 points below epoch 12 on test).
        if (top1, -val_loss) > (best.best_top1, -best.best_loss):
            best.best_top1, best.best_epoch, best.best_loss = top1, epoch, val_loss
            best_state = copy.deepcopy(model.state_dict())
        if cb.on_epoch:
            cb.on_epoch(stats)
        if cb.on_checkpoint:  # on the CPU: a run on a GPU resumes on a machine without one
            cb.on_checkpoint(cpu_state(_checkpoint(epoch, model, opt, sched, gen, best,
                                                   best_state)))
    model.load_state_dict(best_state)
    if cfg.epochs == 0:
        best.best_top1 = evaluate(model, data.val)[0]
    return best


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model here


def _checkpoint(epoch, model, opt, sched, gen, best, best_state) -> dict:
    """Everything needed to continue after ``epoch``, as tensors and plain types only (so it
    loads with ``weights_only=True``)."""
    prefix = "module." if model is not _unwrap(model) else ""
    return {
        "epoch": epoch,
        "model": _unwrap(model).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "best_state": {k.removeprefix(prefix): v for k, v in best_state.items()},
        "best_top1": best.best_top1,
        "best_epoch": best.best_epoch,
        "best_loss": best.best_loss,
        "history": [dataclasses.asdict(e) for e in best.epochs],
    }


def _restore(state: dict, model, opt, sched, gen, best: FitResult) -> dict:
    _unwrap(model).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    best.best_top1, best.best_epoch = state["best_top1"], state["best_epoch"]
    best.best_loss = state.get("best_loss", float("inf"))  # checkpoints of older versions
    best.epochs = [EpochStats(**e) for e in state["history"]]
    prefix = "module." if model is not _unwrap(model) else ""
    return {prefix + k: v for k, v in state["best_state"].items()}


def _augmented(xs: list[torch.Tensor], cfg: TrainConfig, gen: torch.Generator):
    """Shift (and flip) augmentation for image batches only: a single float (B, C, H, W)
    input. Token ids, sequences and multi-input samples pass through unchanged."""
    if not cfg.augment or len(xs) != 1 or xs[0].dim() != 4 or not xs[0].is_floating_point():
        return xs
    x = augment_batch(xs[0], gen)
    if cfg.hflip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return [x]


def _train_epoch(model, loader, opt, sched, cfg, teacher, extra_loss, gen, cb, epoch) -> float:
    model.train()
    device = device_of(_unwrap(model))
    running, seen = 0.0, 0
    for step, (*xs, y) in enumerate(loader, 1):
        # to the device first (asynchronous from pinned memory), then shifted there
        xs = _augmented([x.to(device, non_blocking=True) for x in xs], cfg, gen)
        y = y.to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = call(model, xs)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = call(teacher, xs)
                loss = kd_loss(logits.float(), t_logits.float(), y, cfg.temperature, cfg.alpha)
            else:
                loss = F.cross_entropy(logits.float(), y)
            if extra_loss is not None:
                loss = loss + extra_loss(xs, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item() * len(y)
        seen += len(y)
        if cb.on_step:
            cb.on_step(epoch, step, loss.item())
    return running / max(seen, 1)
