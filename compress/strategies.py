"""Search strategies over one Session: staged (the default) and Optuna's TPE.

See search.py's docstring for why staged is the default.
"""

from __future__ import annotations

from collections.abc import Callable

from .candidates import Spec
from .errors import TorchslimError
from .search import OBJECTIVE_KEY, Session, Stop


def _epochs(swap: str, ratio: float, epochs: int) -> int:
    return epochs if swap != "none" or ratio > 0 else 0


def _bisect_largest(grid: list[float], ok: Callable[[float], bool]) -> int:
    """Index of the largest grid value with ok(), assuming ok is monotone (True, then False)."""
    lo, hi = -1, len(grid)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(grid[mid]):
            lo = mid
        else:
            hi = mid
    return lo


def staged(s: Session, swaps, precisions) -> None:
    cfg, grid = s.cfg, s.cfg.grid()
    proxies: dict[tuple[str, float], float] = {}

    def proxy(swap: str, r: float) -> float:
        if (swap, r) not in proxies:
            try:
                proxies[swap, r] = _proxy(s, swap, r)
            except Exception:  # its candidates failed (and say why): order it last
                proxies[swap, r] = float("inf")
        return proxies[swap, r]

    rank_prec = "int8" if "int8" in precisions else precisions[-1]
    if "none" in swaps:  # (0) no training: seconds, and an answer exists early on
        for p in dict.fromkeys([rank_prec, "fp32"]):
            if p in precisions:
                s.evaluate(Spec("none", 0.0, 0, p))
    limits = {}
    for swap in swaps:  # (1) rank: how far can each architecture be pruned?
        def promising(r, swap=swap):
            stage = "rank" if r > 0 or swap != "none" else "final"
            recs = [s.evaluate(Spec(swap, r, _epochs(swap, r, cfg.rank_epochs), p), stage)
                    for p in dict.fromkeys([rank_prec, "fp32"]) if p in precisions]
            return any(s.ok(rec, cfg.rank_slack) for rec in recs)

        limits[swap] = _bisect_largest(grid, promising)
    pool = [(swap, r) for swap in swaps for r in grid[: limits[swap] + 1]]
    pool.sort(key=lambda p: proxy(*p))
    # per architecture: the most pruned level that held the guard after a full fine-tune,
    # and the least pruned level above it that did not (or that the ranking rejected)
    held: dict[str, float] = {}
    rejected = {swap: grid[limits[swap] + 1] for swap in swaps if limits[swap] + 1 < len(grid)}
    missed = dict(rejected)  # the first level each ranking rejected, until a full one says

    def finalist(swap: str, r: float) -> None:
        if _finalist(s, swap, r, precisions):
            held[swap] = max(held.get(swap, r), r)
            if missed.get(swap, 2.0) <= held[swap]:  # the ranking was wrong: above is unknown
                del missed[swap]
        elif r > held.get(swap, -1.0):
            missed[swap] = min(missed.get(swap, r), r)

    for swap, r in pool:  # (2) finalists, most compressed first
        if swap in held:
            continue
        finalist(swap, r)
        if swap in held and (cfg.objective != "latency" or set(held) == set(swaps)):
            break  # the proxy orders size and MACs exactly; latency needs measuring
    if not held:  # nothing within the guard: more pruning will not be either
        return
    # (3) second chance: the first level each architecture's short fine-tune rejected gets
    # a full one when it would beat the answer (3 epochs under-recover, a swap most).
    # While such a level holds, the next one up gets its full fine-tune too (the ranking
    # was wrong about it, so it says nothing about the levels above).
    best = min(proxy(swap, r) for swap, r in held.items())
    for swap, r in sorted((p for p in rejected.items() if proxy(*p) < best),
                          key=lambda p: proxy(*p)):
        finalist(swap, r)
        while held.get(swap) == r and grid.index(r) + 1 < len(grid):
            r = grid[grid.index(r) + 1]
            finalist(swap, r)
    # (4) refine: halve the gap between the level that held and the one that did not while
    # time remains; the grid is coarse where it matters (PDModel: prune 0.5 is 15x smaller
    # in int8, 0.6 is 23x).
    while True:
        best = min(proxy(swap, r) for swap, r in held.items())
        mids = [(swap, round((lo + missed[swap]) / 2, 2)) for swap, lo in held.items()
                if swap in missed]
        mids = [(swap, r) for swap, r in mids if held[swap] < r < missed[swap]
                and missed[swap] - held[swap] > cfg.prune_step / 4 + 1e-9
                and proxy(swap, r) < best]
        if not mids:
            return
        finalist(*min(mids, key=lambda p: proxy(*p)))


def _finalist(s: Session, swap: str, r: float, precisions) -> bool:
    cfg = s.cfg
    order = [("int8", 0)] if "int8" in precisions else []
    order += [("int8-mixed", k) for k in cfg.keep_fp32[:1] if "int8-mixed" in precisions]
    order += [("qat", 0)] if "qat" in precisions else []
    order += [("int8-mixed", k) for k in cfg.keep_fp32[1:] if "int8-mixed" in precisions]
    order += [(p, 0) for p in ("fp16", "fp32") if p in precisions]
    epochs = _epochs(swap, r, cfg.final_epochs)
    for prec, keep in order:
        if s.ok(s.evaluate(Spec(swap, r, epochs, prec, keep))):
            if cfg.objective == "latency" and prec != "fp32" and "fp32" in precisions:
                # seconds (an export of the same weights), and at batch 1 ONNX Runtime's
                # fp32 often beats its int8 on small pruned models (PDModel pruned 0.7:
                # 0.246 against 0.318 ms); the choice compares the two measured
                s.evaluate(Spec(swap, r, epochs, "fp32"))
            return True
    return False


def _proxy(s: Session, swap: str, r: float) -> float:
    """Size/MACs of the pruned architecture before any training: the order of finalists."""
    from .measure import count_macs, count_params
    from .prune import PruneConfig, prune_model

    parent = s.builder.parent(swap)
    example = s.ctx.data.head(1)
    model = parent if r == 0 else prune_model(parent, PruneConfig(ratio=r, seed=s.cfg.seed),
                                              example)[0]
    if s.cfg.objective == "size":
        return count_params(model)[0]
    return count_macs(model, example)


def optuna_search(s: Session, swaps, precisions) -> None:
    """Optuna's multi-objective TPE over the same space (full fine-tunes, no ranking)."""
    try:
        import optuna
    except ImportError:
        raise TorchslimError("--strategy optuna needs Optuna: pip install "
                             "'torchslim[search]' (or use the default staged strategy)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = s.cfg
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True,
                                         n_startup_trials=4)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    key = OBJECTIVE_KEY[cfg.objective]
    while True:
        trial = study.ask()
        swap = trial.suggest_categorical("swap", list(swaps))
        r = trial.suggest_float("prune", 0.0, cfg.max_prune, step=cfg.prune_step)
        prec = trial.suggest_categorical("precision", list(precisions))
        spec = Spec(swap, round(r, 4), _epochs(swap, r, cfg.final_epochs), prec,
                    cfg.keep_fp32[0] if prec == "int8-mixed" and cfg.keep_fp32 else 0)
        try:
            rec = s.evaluate(spec)
        except Stop:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if "failed" in rec:  # recorded; TPE learns to avoid the region
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, [rec["val_accuracy"], float(rec[key] or 0)])
