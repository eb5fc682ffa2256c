"""Knowledge distillation: a trained teacher teaches a student (Hinton et al., 2015).

Built on the shared loop in train.py: ``fit(..., teacher=...)`` gives the soft + hard loss,
and the optional feature loss (FitNets-style hints on matched layers) is its ``extra_loss``,
fed by forward hooks. Under ``torchrun`` the student trains with DistributedDataParallel:
each of the N processes takes batch_size / N images per step and DDP averages gradients,
which equals one full-batch step.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import register_config
from .device import cpu_state, resolve_device
from .errors import TorchslimError, UsageError
from .inputs import call
from .train import Callbacks, FitResult, TrainConfig, evaluate, fit


@register_config("distill")
@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 64  # the global batch: split across processes under torchrun
    weight_decay: float = 1e-4
    seed: int = 0
    temperature: float = 4.0  # softens both distributions so the teacher's "dark knowledge" shows
    alpha: float = 0.7  # weight of the soft (teacher) loss; 1 - alpha goes to the labels
    augment: bool = True  # random shifts (no flips unless hflip)
    hflip: bool = False
    matches: tuple[str, ...] = ()  # "teacher.layer:student.layer" pairs for the feature loss
    feature_weight: float = 1.0  # weight of the feature (hint) loss when matches are given
    device: str = "cpu"  # where it trains (cuda:LOCAL_RANK per process under torchrun)
    amp: str = "off"  # "bf16": mixed-precision forward passes

    def __post_init__(self):
        self.train_config(1)  # TrainConfig validates the shared fields
        for m in self.matches:
            t, sep, s = m.partition(":")
            if not sep or not t or not s:
                raise UsageError(f"--match must look like teacher.layer:student.layer, got {m!r}")
        if self.feature_weight < 0:
            raise UsageError(f"--feature-weight must be >= 0, got {self.feature_weight}")

    def train_config(self, world: int) -> TrainConfig:
        if self.batch_size % world:
            raise UsageError(
                f"--batch-size {self.batch_size} must be divisible by the {world} processes"
            )
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size // world,
            weight_decay=self.weight_decay, seed=self.seed, augment=self.augment,
            hflip=self.hflip, temperature=self.temperature, alpha=self.alpha,
            device=self.device, amp=self.amp,
        )


# --- feature matching -------------------------------------------------------------------


@dataclass
class FeatureMatch:
    teacher_layer: str
    student_layer: str
    teacher_shape: tuple[int, ...]  # per sample, no batch dimension
    student_shape: tuple[int, ...]
    adapter: nn.Module  # student width -> teacher width (Identity when they agree)


@dataclass
class FeatureLoss:
    """Hooks that capture matched layers' outputs and the loss on them (fit's extra_loss)."""

    matches: list[FeatureMatch]
    weight: float
    adapters: nn.ModuleList
    feats: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: list = field(default_factory=list)
    apply_adapters: Callable | None = None  # DDP wrapper of the adapters under torchrun

    def attach(self, teacher: nn.Module, student: nn.Module) -> None:
        for i, m in enumerate(self.matches):
            self.handles.append(_capture(teacher, m.teacher_layer, self.feats, f"t{i}"))
            self.handles.append(_capture(student, m.student_layer, self.feats, f"s{i}"))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.feats.clear()

    def __call__(self, xs, logits: torch.Tensor) -> torch.Tensor:
        students = [self.feats[f"s{i}"] for i in range(len(self.matches))]
        adapted = (self.apply_adapters or _AdapterStack(self.adapters))(students)
        # Relative MSE (divided by the teacher feature's mean square): raw feature scales
        # differ per layer by orders of magnitude, and would swamp the KD loss.
        losses = []
        for i, a in enumerate(adapted):
            t = self.feats[f"t{i}"].detach()
            losses.append(F.mse_loss(a, t) / t.square().mean().clamp_min(1e-8))
        return self.weight * torch.stack(losses).mean()


class _AdapterStack(nn.Module):
    def __init__(self, adapters: nn.ModuleList):
        super().__init__()
        self.adapters = adapters

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [a(f) for a, f in zip(self.adapters, feats, strict=True)]


def _capture(model: nn.Module, name: str, store: dict, key: str):
    def hook(module, args, output):
        store[key] = output

    return _submodule(model, name).register_forward_hook(hook)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TorchslimError(
            f"--match: no layer {name!r} in the model{hint}; use the dotted names "
            "model.named_modules() gives, e.g. features.3"
        ) from None


@torch.no_grad()
def build_feature_loss(teacher, student, pairs, example, weight) -> FeatureLoss:
    """Probe both models once to learn the matched shapes and make the width adapters."""
    matches = []
    for pair in pairs:
        t_name, _, s_name = pair.partition(":")
        t_shape = _output_shape(teacher, t_name, example)
        s_shape = _output_shape(student, s_name, example)
        matches.append(FeatureMatch(t_name, s_name, t_shape, s_shape, _adapter(pair, t_shape,
                                                                              s_shape)))
    adapters = nn.ModuleList([m.adapter for m in matches])
    return FeatureLoss(matches, weight, adapters)


def _output_shape(model: nn.Module, name: str, example: torch.Tensor) -> tuple[int, ...]:
    seen: dict[str, torch.Tensor] = {}
    handle = _capture(model, name, seen, "out")
    was_training = model.training
    try:
        model.eval()
        call(model, example)
    finally:
        model.train(was_training)
        handle.remove()
    out = seen.get("out")
    if not isinstance(out, torch.Tensor):
        raise TorchslimError(f"--match: layer {name!r} does not output one tensor; match another")
    return tuple(out.shape[1:])


def _adapter(pair: str, t_shape, s_shape) -> nn.Module:
    """A learned 1x1 conv (maps) or linear (vectors) from student width to teacher width."""
    if len(t_shape) != len(s_shape) or len(t_shape) not in (1, 3) or t_shape[1:] != s_shape[1:]:
        raise TorchslimError(
            f"--match {pair}: incompatible shapes teacher {_dims(t_shape)} vs student "
            f"{_dims(s_shape)}; match layers with the same spatial size (widths may differ) "
            "or two vector outputs"
        )
    if t_shape[0] == s_shape[0]:
        return nn.Identity()
    if len(t_shape) == 3:
        return nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False)
    return nn.Linear(s_shape[0], t_shape[0], bias=False)


def _dims(shape) -> str:
    return "x".join(str(v) for v in shape)


# --- classes and distributed set-up -----------------------------------------------------


@torch.no_grad()
def check_classes(teacher: nn.Module, student: nn.Module, example, num_classes: int) -> None:
    counts = {}
    for label, model in (("teacher", teacher), ("student", student)):
        was_training = model.training
        model.eval()
        counts[label] = int(call(model, example).shape[1])
        model.train(was_training)
    if counts["teacher"] != counts["student"]:
        raise TorchslimError(
            f"teacher outputs {counts['teacher']} classes but the student {counts['student']}; "
            f"build the student with --num-classes {counts['teacher']}"
        )
    if counts["teacher"] != num_classes:
        raise TorchslimError(
            f"the models output {counts['teacher']} classes but the data has {num_classes}; "
            "distil on the data the teacher was trained for"
        )


@dataclass
class Dist:
    """This process's place under torchrun (world 1 without it)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    # under torchrun, even with one process: a process group (NCCL on CUDA) and DDP, so
    # `torchrun --nproc-per-node 1` on a one-GPU machine runs the multi-GPU code path
    launched: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; a plain run has none of them."""
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return Dist()
    return Dist(int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")), launched=True)


def init_distributed(d: Dist, device: str) -> str:
    """Join the process group (gloo on CPU, nccl on GPU); return this process's device."""
    import torch.distributed as dist

    if not d.launched:
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)
        device = f"cuda:{d.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


# --- the verb ---------------------------------------------------------------------------


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data,
    cfg: DistillConfig,
    callbacks: Callbacks | None = None,
    *,
    resume: dict | None = None,
    dist_info: Dist | None = None,
) -> tuple[nn.Module, FitResult]:
    """Train ``student`` (in place, and returned) to mimic ``teacher`` on ``data``.

    Returns the student with its best-validation weights (the student as given counts as
    epoch 0) and the FitResult. A ``resume``
    state (from ``callbacks.on_checkpoint``) continues an interrupted run; it carries the
    adapters' weights under "adapters". Under torchrun pass ``dist_info=dist_from_env()``.
    """
    d = dist_info or Dist()
    device = init_distributed(d, resolve_device(cfg.device))
    tcfg = cfg.train_config(d.world)
    tcfg = TrainConfig(**{**vars(tcfg), "device": device})
    example = data.head(2)
    check_classes(teacher, student, example, data.num_classes)
    feature = (
        build_feature_loss(teacher, student, cfg.matches, example, cfg.feature_weight)
        if cfg.matches else None
    )
    if resume is not None:
        _check_resume(resume, student)
    if feature is not None and resume is not None and "adapters" in resume:
        feature.adapters.load_state_dict(resume["adapters"])
    cb = _with_adapter_state(callbacks, feature)
    start = _start_point(student, data) if resume is None else None
    model = _wrap_ddp(student, feature, d, device) if d.launched else student.to(device)
    sampler = _sampler(data, d, cfg.seed)
    if feature is not None:
        feature.adapters.to(device)
        feature.attach(teacher, student)
    try:
        result = fit(
            model, data, tcfg, teacher=teacher, extra_loss=feature, callbacks=cb,
            extra_params=list(feature.adapters.parameters()) if feature else None,
            sampler=sampler, resume=resume,
        )
    finally:
        if feature is not None:
            feature.detach()
            feature.adapters.cpu()
    if start is not None and start[0] > result.best_top1:
        # The student as given competes as "epoch 0": a swapped model that starts at the
        # teacher's accuracy is never made worse by its recovery run.
        student.load_state_dict(start[1])
        result.best_top1, result.best_epoch = start[0], 0
    return student, result


def _start_point(student: nn.Module, data) -> tuple[float, dict]:
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return evaluate(student, data.val)[0], state


def _check_resume(state: dict, student: nn.Module) -> None:
    try:
        student.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:150]
        raise TorchslimError(
            f"--resume: the checkpoint does not fit this student ({first}); resume with the "
            "same --student and options as the interrupted run"
        ) from None


def _with_adapter_state(callbacks: Callbacks | None, feature: FeatureLoss | None) -> Callbacks:
    cb = callbacks or Callbacks()
    if feature is None or cb.on_checkpoint is None:
        return cb
    inner = cb.on_checkpoint

    def on_checkpoint(state: dict) -> None:
        inner({**state, "adapters": cpu_state(feature.adapters.state_dict())})

    return Callbacks(cb.on_start, cb.on_step, cb.on_epoch, on_checkpoint)


def _sampler(data, d: Dist, seed: int):
    """The same global sample order for any process count: with N processes, step k's N
    per-process batches together hold exactly the one-process run's batch k."""
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True,
                              seed=seed, drop_last=True)


def _wrap_ddp(student, feature, d: Dist, device: str):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.local_rank] if device.startswith("cuda") else None
    model = DDP(student.to(device), device_ids=ids)
    if feature is not None and any(True for _ in feature.adapters.parameters()):
        # Adapters are trained too, so their gradients must be averaged like the student's.
        feature.apply_adapters = DDP(_AdapterStack(feature.adapters).to(device), device_ids=ids)
    return model
