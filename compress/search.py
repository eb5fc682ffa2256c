"""Say the goal, not the recipe: an accuracy-guarded search over torchslim's methods.

The user gives the accuracy they can lose (``max_acc_drop`` points) and what to minimise
(file size, latency or MACs), optionally a target (size, latency); the search looks through
architecture swap x pruning ratio x distillation x final precision for the best model within
the guard, and reports every candidate it measured and the Pareto front.

Strategy ("staged", the default; measured against Optuna's multi-objective TPE, see README):
accuracy falls monotonically with the pruning ratio, and size, MACs and latency fall with it
while barely depending on the weights, so the search is a one-dimensional search per
architecture. (1) Rank: for each architecture, bisect the ratio grid with short fine-tunes
to find how far pruning can go (with a slack, since a short fine-tune under-recovers).
(2) Finalists: walk from the most compressed promising point down, full fine-tune, and try
the precisions cheapest-first (static int8, int8 with its noisiest layers in fp32, QAT,
fp32); the first point within the guard on validation is the answer.

Honest selection: candidates are chosen on the validation split; the test split (held out
from the input model, the search and the choice) only reports, and the goal is checked on it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .candidates import (
    DISTILL_ALPHA,
    PRECISIONS,
    SWAPS,
    Builder,
    Context,
    Spec,
    Stop,
    append_record,
    read_records,
)
from .errors import TorchslimError, UsageError

OBJECTIVES = ("size", "latency", "macs")
STRATEGIES = ("staged", "optuna")
OBJECTIVE_KEY = {"size": "file_bytes", "latency": "latency_ms_median", "macs": "macs"}
RECORDS = "candidates.jsonl"
# Batch-1 medians of one artifact differ by this much between runs on a shared 2-core
# machine (PDModel pruned 0.6, int8: 0.409 and 0.420 ms; pruned 0.5: 0.335 and 0.363 ms):
# candidates this close to the fastest are tied on latency, and the more accurate wins.
LATENCY_NOISE = 0.10
FINGERPRINT = "search.json"
SPACE = "space.json"  # what the search tries on this model and what it left out


@dataclass(frozen=True)
class SearchConfig:
    max_acc_drop: float = 0.5  # accuracy points the user accepts to lose
    objective: str = "size"
    target_size: float | None = None  # fraction of the input file size, e.g. 0.05 (1/20)
    target_size_kb: float | None = None
    target_latency_ms: float | None = None  # batch-1 median
    target_speedup: float | None = None  # batch-1 median, against the input model
    time_budget_s: float | None = None
    trials: int | None = None  # candidates measured in this run
    strategy: str = "staged"
    swaps: tuple[str, ...] | None = None  # None: keep and depthwise-separable (+hard if useful)
    max_prune: float = 0.7
    prune_step: float = 0.1
    precisions: tuple[str, ...] | None = None  # None: all the output kind can hold
    rank_epochs: int = 3  # short fine-tune that ranks pruning levels
    final_epochs: int = 12  # full fine-tune for finalists (the demo's recipe uses 12)
    rank_slack: float = 2.0  # points a short fine-tune may lag and still be promising
    keep_fp32: tuple[int, ...] = (1, 2)  # int8-mixed variants: layers kept in fp32
    qat_epochs: int = 3
    distill_alpha: float = DISTILL_ALPHA  # teacher's share of the fine-tunes' loss
    test_share: float = 0.5  # of the held-out images: test; the rest is validation
    seed: int = 0

    def __post_init__(self):
        if self.max_acc_drop < 0:
            raise UsageError(f"--max-acc-drop must be >= 0 points, got {self.max_acc_drop}")
        _one_of("--objective", self.objective, OBJECTIVES)
        _one_of("--strategy", self.strategy, STRATEGIES)
        targets = [t for t in (self.target_size, self.target_size_kb, self.target_latency_ms,
                               self.target_speedup) if t is not None]
        if len(targets) > 1:
            raise UsageError("give at most one of --target-size, --target-size-kb, "
                             "--target-latency-ms, --target-speedup")
        if any(t <= 0 for t in targets) or (self.target_size or 0) > 1:
            raise UsageError("targets must be positive (and --target-size a fraction <= 1, "
                             "e.g. 1/20)")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UsageError(f"--time-budget must be positive, got {self.time_budget_s}s")
        if self.trials is not None and self.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.trials}")
        for s in self.swaps or ():
            _one_of("swap", s, SWAPS)
        for p in self.precisions or ():
            _one_of("precision", p, PRECISIONS)
        if not 0.0 <= self.max_prune < 1.0 or not 0.0 < self.prune_step < 1.0:
            raise UsageError("--prune bound must be in [0, 1) and the step in (0, 1)")
        if self.rank_epochs < 1 or self.final_epochs < 1 or self.qat_epochs < 1:
            raise UsageError("rank, final and QAT epochs must be >= 1")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.distill_alpha}")

    @property
    def has_target(self) -> bool:
        return any(v is not None for v in (self.target_size, self.target_size_kb,
                                           self.target_latency_ms, self.target_speedup))

    def grid(self) -> list[float]:
        n = int(self.max_prune / self.prune_step + 1e-9)
        return [round(i * self.prune_step, 4) for i in range(n + 1)]

    def describe_goal(self) -> str:
        goal = f"at most {self.max_acc_drop:g} points below the input on test"
        for name, v, unit in (("file <=", self.target_size, "x of the input"),
                              ("file <=", self.target_size_kb, " KB"),
                              ("latency <=", self.target_latency_ms, " ms"),
                              ("speed-up >=", self.target_speedup, "x")):
            if v is not None:
                goal += f", {name} {v:g}{unit}"
        return goal + f"; minimising {self.objective}"


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def parse_fraction(text: str) -> float:
    """``1/20`` or ``0.05`` -> 0.05."""
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise UsageError(
            f"--target-size must be a fraction like 1/20 or 0.05, got {text!r}") from None


def parse_duration(text: str) -> float:
    """``15m``, ``90s``, ``1h`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UsageError(f"--time-budget must look like 15m, 90s or 1h, got {text!r}") from None


# --- the goal -----------------------------------------------------------------------------


def measured(rec: dict) -> bool:
    """Whether the candidate was built and measured (not one that failed)."""
    return "failed" not in rec


def drop(rec: dict, base: dict, split: str = "val") -> float:
    return base[f"{split}_accuracy"] - rec[f"{split}_accuracy"]


def meets_target(rec: dict, base: dict, cfg: SearchConfig) -> bool:
    checks = [
        cfg.target_size is None or rec["file_bytes"] <= cfg.target_size * base["file_bytes"],
        cfg.target_size_kb is None or rec["file_bytes"] <= cfg.target_size_kb * 1024,
        cfg.target_latency_ms is None or rec["latency_ms_median"] <= cfg.target_latency_ms,
        cfg.target_speedup is None
        or base["latency_ms_median"] / rec["latency_ms_median"] >= cfg.target_speedup,
    ]
    return all(checks)


def feasible(rec: dict, base: dict, cfg: SearchConfig, split: str = "val") -> bool:
    # 1e-9: a candidate exactly at the guard (same images right) is within it
    return measured(rec) and drop(rec, base, split) <= cfg.max_acc_drop + 1e-9 and \
        meets_target(rec, base, cfg)


def finished(rec: dict) -> bool:
    """Whether a candidate may be chosen: a short fine-tune that only ranks pruning levels
    may not. It is under-trained, and matching the guard on a few hundred validation
    images after 3 epochs is as often luck as merit (on digits one such candidate equalled
    the input on validation and lost 3 of 180 test images); its full fine-tune is what
    ships. Records of older searches have no stage and count as finished."""
    return rec.get("stage", "final") != "rank"


def choose(records: list[dict], base: dict, cfg: SearchConfig) -> dict | None:
    """On validation only: the best objective among feasible finished candidates (with a
    target: the most accurate of those meeting it); ties go to the other criterion."""
    ok = [r for r in records if finished(r) and feasible(r, base, cfg)]
    if not ok:
        return None
    key = OBJECTIVE_KEY[cfg.objective]
    if cfg.has_target:
        return max(ok, key=lambda r: (r["val_accuracy"], -(r[key] or 0)))
    if cfg.objective == "latency":  # within the timer's noise of the fastest: a tie
        fastest = min(r[key] or 0 for r in ok)
        ok = [r for r in ok if (r[key] or 0) <= fastest * (1 + LATENCY_NOISE)]
        return max(ok, key=lambda r: (r["val_accuracy"], -(r[key] or 0)))
    return min(ok, key=lambda r: (r[key] or 0, -r["val_accuracy"]))


def closest(records: list[dict], base: dict, cfg: SearchConfig) -> dict | None:
    """For a goal not met: the candidate nearest to it (meeting the target when possible)."""
    records = [r for r in records if measured(r)]
    done = [r for r in records if finished(r)] or records
    pool = [r for r in done if meets_target(r, base, cfg)] or done
    return max(pool, key=lambda r: r["val_accuracy"]) if pool else None


def front(records: list[dict], metric: str) -> list[dict]:
    """Non-dominated candidates for (validation accuracy up, ``metric`` down)."""
    ranked = sorted((r for r in records if measured(r) and r.get(metric) is not None),
                    key=lambda r: (r[metric], -r["val_accuracy"]))
    out, best = [], float("-inf")
    for r in ranked:
        if r["val_accuracy"] > best:
            out.append(r)
            best = r["val_accuracy"]
    return out


# --- one run --------------------------------------------------------------------------------


@dataclass
class SearchResult:
    baseline: dict
    records: list[dict]
    chosen: dict | None
    status: str  # "met" | "val-only" (test misses the goal) | "infeasible"
    message: str
    stopped: str | None = None  # why the search ended early, if it did
    seconds: float = 0.0
    fronts: dict[str, list[str]] = field(default_factory=dict)  # metric -> candidate keys
    space: dict | None = None  # what the search tried, and what it left out and why
    interrupted: KeyboardInterrupt | None = None  # Ctrl-C / SIGTERM: re-raised once written

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if not measured(r)]

    def to_dict(self, cfg: SearchConfig) -> dict:
        return {"format": "torchslim-search/1", "config": dataclasses.asdict(cfg),
                "goal": cfg.describe_goal(), "status": self.status, "message": self.message,
                "stopped": self.stopped, "seconds": round(self.seconds, 1),
                "space": self.space,
                "left_out": (self.space or {}).get("notes", []),
                "failed": {r["key"]: r["failed"] for r in self.failed},
                "baseline": self.baseline,
                "chosen": self.chosen["key"] if self.chosen else None,
                "fronts": self.fronts, "candidates": self.records}


class Session:
    """The state of one search run: measured records, budget, and the builder."""

    def __init__(self, cfg: SearchConfig, ctx: Context, baseline: dict,
                 on_record: Callable[[dict, bool], None] | None = None):
        self.cfg, self.ctx, self.baseline = cfg, ctx, baseline
        self.builder = Builder(ctx)
        self.path = ctx.workdir / RECORDS
        self.done = read_records(self.path)
        self.records: list[dict] = []
        self.on_record = on_record or (lambda _r, _resumed: None)
        self.start = time.perf_counter()
        self.measured = 0
        self.epoch_seconds: float | None = None
        ctx.check_time = self.check_time
        ctx.on_epoch_seconds = self._epoch_seconds

    # -- budget --------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check_time(self) -> None:
        budget = self.cfg.time_budget_s
        if budget is not None and self.elapsed() >= budget:
            raise Stop(f"time budget of {budget:g}s spent")

    def _epoch_seconds(self, s: float) -> None:
        self.epoch_seconds = s if self.epoch_seconds is None else max(self.epoch_seconds, s)

    def affordable(self, epochs: int) -> None:
        """Stop before starting work that cannot finish within the budget."""
        self.check_time()
        if self.cfg.trials is not None and self.measured >= self.cfg.trials:
            raise Stop(f"{self.cfg.trials} trials measured")
        budget = self.cfg.time_budget_s
        if budget is not None and self.epoch_seconds is not None:
            need = epochs * self.epoch_seconds
            if self.elapsed() + need > budget:
                raise Stop(f"time budget of {budget:g}s: {budget - self.elapsed():.0f}s left, "
                           f"the next fine-tune needs ~{need:.0f}s")

    # -- candidates ------------------------------------------------------------------------
    def evaluate(self, spec: Spec, stage: str = "final") -> dict:
        """Measure ``spec`` (or take its record from this or an earlier run). ``stage``
        "rank" marks a short fine-tune that ranks and may not be chosen."""
        if spec.key in self.done:
            rec = self.done[spec.key]
            if stage == "final":  # rank and final fine-tunes may coincide (equal epochs)
                rec["stage"] = "final"
            if rec not in self.records:
                self.records.append(rec)
                self.on_record(rec, True)
            return rec
        untrained = spec.trained_key not in self.builder.trained and not (
            self.ctx.workdir / "models" / f"{spec.trained_key}.pt").exists()
        extra = self.cfg.qat_epochs if spec.precision == "qat" else 0
        self.affordable((spec.epochs if untrained and spec.changes_architecture else 0) + extra)
        t0 = time.perf_counter()
        try:
            path, configs, extra = self.builder.build(spec)
            rec = {**self.builder.measure(spec, path, configs), **extra}
            rec["artifact"] = str(path.relative_to(self.ctx.workdir))
        except Stop:
            raise
        except Exception as exc:  # one candidate's failure never ends the search
            rec = failed_record(spec, exc)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        rec["stage"] = stage
        append_record(self.path, rec)
        self.done[spec.key] = rec
        self.records.append(rec)
        self.measured += 1
        self.on_record(rec, False)
        return rec

    def ok(self, rec: dict, slack: float = 0.0) -> bool:
        return measured(rec) and drop(rec, self.baseline) <= self.cfg.max_acc_drop + slack + 1e-9


def failed_record(spec: Spec, exc: BaseException) -> dict:
    """A candidate that could not be built or measured, with its one-line reason."""
    from .space import _reason

    reason = _reason(exc)
    if not isinstance(exc, TorchslimError):
        reason = f"{type(exc).__name__}: {reason}"
    return {"key": spec.key, "label": spec.label(), "spec": dataclasses.asdict(spec),
            "failed": reason}


# --- strategies -------------------------------------------------------------------------------


def swaps_for(cfg: SearchConfig, teacher) -> tuple[str, ...]:
    from .candidates import has_soft_activations

    if cfg.swaps is not None:
        return cfg.swaps
    return ("none", "dws", "dws-hard") if has_soft_activations(teacher) else ("none", "dws")


def precisions_for(cfg: SearchConfig, suffix: str) -> tuple[str, ...]:
    from .candidates import PRECISIONS_FOR

    allowed = PRECISIONS_FOR[suffix]
    missing = [p for p in cfg.precisions or () if p not in allowed]
    if missing:
        raise UsageError(f"{', '.join(missing)} cannot be written as {suffix}: int8 needs "
                         "-o model.onnx, fp16 needs -o model.pt")
    return tuple(cfg.precisions or allowed)


# --- the verb ----------------------------------------------------------------------------------


def search(cfg: SearchConfig, ctx: Context, baseline: dict, *, on_record=None,
           space: tuple | None = None, on_note=None) -> SearchResult:
    """Run the search (or, with ``space`` = ((Spec, ...)), measure exactly those specs),
    then choose on validation and check the goal on test.

    Whatever ends it (the budget, a failure outside one candidate, Ctrl-C), the candidates
    measured so far are concluded; an interruption is handed back in ``interrupted``."""
    check_workdir(ctx.workdir, fingerprint(cfg, ctx))
    s = Session(cfg, ctx, baseline, on_record)
    # a bad option (a precision the output cannot hold) is a usage error, not a search
    # that stopped
    left = None if space is not None else search_space(s, on_note or (lambda _t: None))
    stopped, interrupted = None, None
    try:
        _run(s, space, left)
    except Stop as exc:
        stopped = str(exc)
    except KeyboardInterrupt as exc:  # signals_raise's Interrupted is one
        stopped, interrupted = "interrupted", exc
    except Exception as exc:  # the search's own failure: keep what it measured
        from .space import _reason

        stopped = f"stopped by an error: {type(exc).__name__}: {_reason(exc)}"
    result = conclude(s.records, baseline, cfg, stopped, s.elapsed())
    result.space, result.interrupted = left.to_dict() if left else None, interrupted
    if stopped is None or stopped.endswith("trials measured"):  # else: no extra work
        _diagnose_chosen(s, result.chosen)
    return result


def _run(s: Session, space: tuple | None, left) -> None:
    if space is not None:
        for spec in space:
            s.evaluate(spec)
        return
    from .strategies import optuna_search, staged

    run = optuna_search if s.cfg.strategy == "optuna" else staged
    run(s, left.swaps, left.precisions)


def search_space(s: Session, say: Callable[[str], None]):
    """The space that applies to this model (space.py); what it leaves out is said, kept
    in the work folder and, through the result, in .pareto.json."""
    from .space import applicable

    cfg = s.cfg
    left = applicable(s.ctx, swaps_for(cfg, s.ctx.teacher), cfg.max_prune,
                      cfg.grid()[1] if len(cfg.grid()) > 1 else 0.0,
                      precisions_for(cfg, s.ctx.suffix))
    for note in left.notes:
        say(note)
    s.cfg = replace(cfg, max_prune=left.max_prune)
    (s.ctx.workdir / SPACE).write_text(json.dumps(left.to_dict(), indent=2))
    return left


def _diagnose_chosen(s: Session, rec: dict | None) -> None:
    """The per-layer int8 table for a chosen static int8 model (int8-mixed ones have it)."""
    if rec is None or rec["spec"]["precision"] != "int8" or "int8_diagnosis" in rec:
        return
    diag = s.builder.diagnosis(Spec(**rec["spec"]))
    rec["int8_diagnosis"] = {**diag.to_dict(), "kept_fp32": []}


def estimate_seconds(cfg: SearchConfig, teacher, data, n_swaps: int) -> tuple[float, float]:
    """A rough duration of the staged search: fine-tune epochs it will likely run, times
    the seconds of one distillation epoch of the input model (timed on two batches; pruned
    students are cheaper, so this leans long), plus ~15 s per measured candidate."""
    import copy
    import math

    import torch

    from .train import kd_loss

    student = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    xs, y = data.head(64), data.train.tensors[-1][:64]
    t0 = time.perf_counter()
    for _ in range(2):
        with torch.no_grad():
            t = teacher(*xs)
        loss = kd_loss(student(*xs), t, y, 4.0, 0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_batch = (time.perf_counter() - t0) / 2
    per_epoch = per_batch * math.ceil(len(data.train) / 64) + 0.5
    bisect = math.ceil(math.log2(len(cfg.grid()) + 1))
    epochs = n_swaps * bisect * cfg.rank_epochs + 2 * (cfg.final_epochs + cfg.qat_epochs)
    candidates = n_swaps * bisect * 2 + 8
    return epochs * per_epoch + 15 * candidates, per_epoch


def conclude(records, baseline, cfg, stopped, seconds) -> SearchResult:
    fronts = {m: [r["key"] for r in front(records, OBJECTIVE_KEY[m])] for m in OBJECTIVES}
    chosen = choose(records, baseline, cfg)
    if chosen is None:
        near = closest(records, baseline, cfg)
        msg = "no candidate meets the goal on validation"
        if near is not None:
            msg += (f"; the closest, {near['label']}, loses {drop(near, baseline):.2f} "
                    f"points on validation")
        return SearchResult(baseline, records, near, "infeasible", msg, stopped, seconds,
                            fronts)
    d_test = drop(chosen, baseline, "test")
    if feasible(chosen, baseline, cfg, "test"):
        return SearchResult(baseline, records, chosen, "met",
                            f"chosen on validation: {chosen['label']}; on the held-out test "
                            f"it {_change(d_test)}", stopped, seconds, fronts)
    msg = (f"chosen on validation ({chosen['label']}) but on the held-out test it loses "
           f"{d_test:.2f} points > {cfg.max_acc_drop:g}: the goal is not met")
    return SearchResult(baseline, records, chosen, "val-only", msg, stopped, seconds, fronts)


def _change(d: float) -> str:
    """A drop in points as a user reads it: "loses 0.56 points", "gains 1.67 points"."""
    return f"gains {-d:.2f} points" if d < -1e-9 else f"loses {max(d, 0.0):.2f} points"


def fingerprint(cfg: SearchConfig, ctx: Context) -> dict:
    """What must match for a work folder's candidates to be reused."""
    d = ctx.data
    return {"model_history": len(ctx.meta.history), "inputs": ctx.meta.input_spec().texts(),
            "data": d.name, "train": len(d.train), "val": len(d.val), "test": len(d.test),
            "seed": cfg.seed, "test_share": cfg.test_share, "suffix": ctx.suffix,
            "distill_alpha": ctx.distill_alpha, "qat_epochs": ctx.qat_epochs,
            "val_checksum": float(sum(t.double().sum() for t in d.val.tensors[:-1])),
            "teacher_checksum": float(sum(p.detach().double().sum()
                                          for p in ctx.teacher.parameters()))}


def check_workdir(workdir: Path, fp: dict) -> None:
    path = workdir / FINGERPRINT
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in fp if not _same(old.get(k), fp[k])]
        if diff:
            raise TorchslimError(
                f"--workdir {workdir} holds a search of another model, data or split "
                f"({', '.join(diff)} differ); use a new --workdir to start afresh")
        return
    path.write_text(json.dumps(fp, indent=2))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def replace(cfg: SearchConfig, **kw) -> SearchConfig:
    return dataclasses.replace(cfg, **kw)
