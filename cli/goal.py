"""`torchslim compress --max-acc-drop`: say the goal, the search finds the recipe.

Parses nothing itself: cli/compress.py hands over its options. This module turns them into
a SearchConfig, runs compress/search.py, and renders the live candidate table, the Pareto
front, the int8 diagnosis and the files.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import typer
from rich.live import Live

from ..compress import pareto
from ..compress.candidates import Context, baseline_record, search_split, spec_from_recipe
from ..compress.device import TrainDevice
from ..compress.errors import UsageError
from ..compress.inputs import resolve
from ..compress.io import LoadOptions, atomic_write, check_output, require_module
from ..compress.search import (
    SearchConfig,
    drop,
    feasible,
    finished,
    parse_duration,
    parse_fraction,
    precisions_for,
    search,
    swaps_for,
)
from .common import fit_progress, open_data, open_model, stderr_console
from .common import stdout_console as out
from .render import Table, fmt_bytes, fmt_count, safe_markup


def goal_config(o: dict) -> SearchConfig:
    """Options -> SearchConfig. With the guard, explicit method flags bound the space."""
    if o["target_macs"] is not None or o["lowrank"] or o["quantize"] in ("dynamic",
                                                                          "weight-only", "bf16"):
        raise UsageError("with --max-acc-drop, use --prune (an upper bound), not --target-macs "
                         "or --lowrank; --quantize may be static, qat or fp16")
    bounds: dict = {}
    if any(o[k] for k in ("swap", "act", "prune", "distill", "quantize")):
        bounds["swaps"] = (("none", "dws", "dws-hard") if o["act"] == "hard" else
                           ("none", "dws")) if o["swap"] else ("none",)
        bounds["max_prune"] = o["prune"] or 0.0
        q = o["quantize"]
        bounds["precisions"] = {None: ("fp32",), "fp16": ("fp32", "fp16"),
                                "static": ("fp32", "int8", "int8-mixed"),
                                "qat": ("fp32", "int8", "int8-mixed", "qat")}[q]
    if o["alpha"] is not None:
        bounds["distill_alpha"] = o["alpha"]
    if o["distill"]:  # --epochs sets the full fine-tune; ranking stays shorter
        bounds["final_epochs"] = o["epochs"]
        bounds["rank_epochs"] = min(SearchConfig.rank_epochs, o["epochs"])
    return SearchConfig(
        max_acc_drop=o["max_acc_drop"], objective=o["objective"],
        target_size=parse_fraction(o["target_size"]) if o["target_size"] else None,
        target_size_kb=o["target_size_kb"], target_latency_ms=o["target_latency_ms"],
        target_speedup=o["target_speedup"],
        time_budget_s=parse_duration(o["time_budget"]) if o["time_budget"] else None,
        trials=o["trials"], strategy=o["strategy"], seed=o["seed"], **bounds)


def goal_options(model: Path, output: Path, data: str, **kw) -> dict:
    """compress's options with their defaults, for callers other than compress (demo)."""
    o = dict(model=model, output=output, data=data, swap=False, act=None, lowrank=None,
             prune=None, target_macs=None, distill=False, epochs=15, alpha=None, quantize=None,
             recipe=None, dump_recipe_to=None, image_size=None, channels=None,
             threads=None, min_time=None, seed=0, train_limit=None, load=LoadOptions(),
             accel=TrainDevice(),
             force=False,
             max_acc_drop=0.5, objective="size",
             target_size=None, target_size_kb=None, target_latency_ms=None,
             target_speedup=None, time_budget=None, trials=None, workdir=None,
             dry_run=False, strategy="staged")
    o.update(kw)
    return o


def pareto_paths(output: Path) -> tuple[Path, Path]:
    # with_name, not with_suffix: "model-v1.2.onnx" keeps its "v1.2"
    return (output.with_name(f"{output.stem}.pareto.json"),
            output.with_name(f"{output.stem}.pareto.png"))


def run_goal(o: dict) -> None:
    """The whole guarded command; ``o`` holds compress's options by name."""
    cfg = goal_config(o)
    output: Path = o["output"]
    if o["data"] is None:
        raise UsageError("--max-acc-drop needs --data: accuracy is what the goal guards")
    suffix = output.suffix.lower()
    if suffix not in (".onnx", ".pt"):
        raise UsageError("name -o like model.onnx (int8 and fp32 in ONNX Runtime) or "
                         "model.pt (fp32/fp16 in torch)")
    outs = [output, *pareto_paths(output), o["dump_recipe_to"]]
    if not o["dry_run"]:
        for path in outs:
            if path is not None:
                check_output(path, force=o["force"], inputs=[o["model"], o["recipe"]])
    loaded = open_model(o["model"], o["load"])
    module = require_module(loaded, "compress")
    base = open_data(o["data"], image_size=o["image_size"], channels=o["channels"],
                     seed=cfg.seed, like=loaded, train_limit=o["train_limit"])
    split = search_split(base, cfg.test_share, cfg.seed)
    stderr_console.print(f"[dim]{safe_markup(split.describe())} (validation chooses, test "
                         "reports; both held out from training)[/]")
    _warn_if_coarse(split, cfg.max_acc_drop)
    space = None
    if o["recipe"] is not None and any(o[k] for k in ("swap", "act", "prune", "quantize")):
        raise UsageError("give steps either as flags or as --recipe, not both")
    if o["recipe"] is not None:
        from ..compress.recipe import load_recipe

        space = (spec_from_recipe(load_recipe(o["recipe"])),)
    teacher = copy.deepcopy(module).float().eval()
    if o["dry_run"]:
        _dry_run(cfg, teacher, split, suffix, space)
        return
    keep = o["workdir"]
    with (nullcontext(str(keep)) if keep else
          tempfile.TemporaryDirectory(prefix=".torchslim-search-", dir=output.parent)) as wd:
        _search_and_write(o, cfg, loaded, teacher, split, Path(wd), space)


def _warn_if_coarse(split, max_drop: float) -> None:
    """Say when one sample is worth more than the guard: the goal then means "no sample
    lost, net", and splits that small disagree by a few samples by chance."""
    n = min(len(split.val), len(split.test))
    if 100.0 / n > max_drop:
        stderr_console.print(
            f"[yellow]warning:[/] one sample is {100.0 / n:.2f} points of the {n}-sample "
            f"validation/test halves, more than --max-acc-drop {max_drop:g}: the guard means "
            "no sample lost, net, and halves this small differ by a few samples by chance; "
            "hold out more data for a finer guard", highlight=False)


def _context(o, cfg, loaded, teacher, split, workdir: Path) -> Context:
    meta = copy.deepcopy(loaded.meta)
    meta.set_input_spec(resolve(meta.input_spec(), split.inputs, model=teacher))
    meta.class_names = meta.class_names or list(split.class_names)
    return Context(teacher=teacher, meta=meta, data=split, workdir=workdir,
                   suffix=o["output"].suffix.lower(), seed=cfg.seed, threads=o["threads"],
                   trust=o["load"].trust,
                   min_run_time=o["min_time"], qat_epochs=cfg.qat_epochs,
                   distill_alpha=cfg.distill_alpha,
                   say=lambda t: stderr_console.print(f"[dim]→ {safe_markup(t)}[/]",
                                                      highlight=False),
                   training=fit_progress, device=o["accel"])


def _search_and_write(o, cfg, loaded, teacher, split, workdir: Path, space) -> None:
    t0 = time.perf_counter()
    ctx = _context(o, cfg, loaded, teacher, split, workdir)
    with stderr_console.status("measuring the input model..."):
        base = baseline_record(loaded, ctx)
    live = _LiveTable(base, cfg)
    stderr_console.print(f"[bold]goal:[/] {cfg.describe_goal()}")
    with live.shown():
        result = search(cfg, ctx, base, on_record=live.add, space=space, on_note=live.note)
    result.seconds = time.perf_counter() - t0
    if result.interrupted is not None:
        where = (f"kept in {o['workdir']}; rerun the same command to resume" if o["workdir"]
                 else "lost: pass --workdir DIR to be able to resume")
        stderr_console.print(f"[bold red]interrupted:[/] writing what was found; the "
                             f"candidates measured so far are {where}", highlight=False)
    json_path, png_path = pareto_paths(o["output"])
    pareto.write_json(result.to_dict(cfg), json_path, force=o["force"])
    pareto.write_png(result, png_path, force=o["force"])
    _show(result, cfg)
    written = [json_path, png_path]
    if result.status == "met":
        src = workdir / result.chosen["artifact"]
        atomic_write(o["output"], lambda t: shutil.copyfile(src, t), force=o["force"])
        written.insert(0, o["output"])
        if o["dump_recipe_to"] is not None:
            _dump(result.chosen, o["dump_recipe_to"], o["force"])
            written.append(o["dump_recipe_to"])
    stderr_console.print("wrote " + ", ".join(safe_markup(p) for p in written))
    # the exit status says whether the goal was met, whatever ended the search; an
    # interrupted search that met nothing keeps the signal's status
    if result.status != "met":
        stderr_console.print(f"[bold red]error:[/] {safe_markup(result.message)}", highlight=False)
        signum = getattr(result.interrupted, "signum", 2) if result.interrupted else None
        raise typer.Exit(128 + signum if signum else 1)


def _dump(rec: dict, path: Path, force: bool) -> None:
    from ..compress.config import config_from_dict
    from ..compress.recipe import dump_recipe

    dump_recipe([config_from_dict(d) for d in rec["recipe"]], path, force=force)


# --- rendering ---------------------------------------------------------------------------------


def _row(r: dict, base: dict, split: str) -> list[str]:
    acc = r[f"{split}_accuracy"]
    return [r["label"], fmt_count(r["params"]), fmt_bytes(r["file_bytes"]),
            f"{base['file_bytes'] / r['file_bytes']:.2f}x", fmt_count(r["macs"]),
            f"{r['latency_ms_median']:.3f}",
            f"{base['latency_ms_median'] / r['latency_ms_median']:.2f}x",
            f"{acc:.2f}", f"{0.0 - drop(r, base, split) + 0.0:+.2f}"]


HEAD = ["candidate", "params", "file", "x smaller", "MACs", "ms b1", "x faster vs input"]


class _LiveTable:
    """Candidates as they are measured (stderr), validation accuracy: what chooses."""

    def __init__(self, base: dict, cfg: SearchConfig):
        self.base, self.cfg, self.rows = base, cfg, []
        self.live = Live(self._table(), console=stderr_console, auto_refresh=False)

    def add(self, rec: dict, resumed: bool) -> None:
        self.rows.append((rec, resumed))
        self.live.update(self._table(), refresh=True)
        if "failed" in rec and not resumed:
            stderr_console.print(f"[yellow]{rec['label']} failed, skipped:[/] "
                                 f"{safe_markup(rec['failed'])}", highlight=False)

    def note(self, text: str) -> None:
        stderr_console.print(f"[yellow]note:[/] {safe_markup(text)}", highlight=False)

    @contextmanager
    def shown(self) -> Iterator[None]:
        try:
            with self.live:
                yield
        finally:
            if not stderr_console.is_terminal:  # rich ends a piped Live mid-line: the next
                stderr_console.line()  # message would be glued to the table's border

    def _table(self) -> Table:
        t = Table(title="torchslim search: candidates (validation chooses)",
                  header_style="bold cyan")
        for col in ("candidate", "file", "x smaller", "ms b1", "val %", "Δ val", "ok", "s"):
            t.add_column(col, justify="left" if col == "candidate" else "right")
        t.add_row(*self._cells(self.base), "", "", style="dim")
        for rec, resumed in self.rows:
            if "failed" in rec:
                t.add_row(rec["label"], *["-"] * 5, "failed", "", style="dim")
                continue
            ok = "✓" if feasible(rec, self.base, self.cfg) else "✗"
            ok += "" if finished(rec) else " rank"  # ranks pruning levels, never chosen
            t.add_row(*self._cells(rec), ok, "resumed" if resumed else f"{rec['seconds']:.0f}")
        return t

    def _cells(self, r: dict) -> list[str]:
        full = _row(r, self.base, "val")  # the compact subset fits an 80-column terminal
        return [full[0], full[2], full[3], full[5], full[7], full[8]]


def _show(result, cfg: SearchConfig) -> None:
    """The fronts with held-out test accuracy (never the data that chose), then the verdict."""
    base = result.baseline
    keys = {k for m in ("size", "latency") for k in result.fronts.get(m, [])}
    if result.chosen is not None:
        keys.add(result.chosen["key"])
    rows = sorted((r for r in result.records if r["key"] in keys),
                  key=lambda r: r["file_bytes"])
    t = Table(title=f"Pareto front (chosen on validation; accuracy on the held-out test, "
                    f"{cfg.describe_goal()})", header_style="bold green")
    for col in [*HEAD, "test %", "Δ test", "front"]:
        t.add_column(col, justify="left" if col == "candidate" else "right")
    t.add_row(*_row(base, base, "test"), "input", style="dim")
    for r in rows:
        fronts = "+".join(m for m in ("size", "latency") if r["key"] in result.fronts[m])
        chosen = result.chosen is not None and r["key"] == result.chosen["key"]
        mark = "chosen " if result.status != "infeasible" else "closest "
        t.add_row(*_row(r, base, "test"), (mark if chosen else "") + fronts,
                  style="bold" if chosen else None)
    out.print(t)
    show_diagnosis((result.chosen or {}).get("int8_diagnosis"))
    n, failed = len(result.records), len(result.failed)
    stop = f"; stopped early: {result.stopped}" if result.stopped else ""
    fails = f" ({failed} failed and skipped)" if failed else ""
    out.print(f"{n} candidates{fails}, {result.seconds / 60:.1f} min{stop}", highlight=False)
    for note in (result.space or {}).get("notes", []):
        out.print(f"left out: {note}", highlight=False)
    out.print(("[green]goal met:[/] " if result.status == "met" else "[red]goal not met:[/] ")
              + result.message, highlight=False)


def show_diagnosis(diag: dict | None) -> None:
    """The per-layer int8 table (``qdiag.Diagnosis.to_dict()`` plus ``kept_fp32``)."""
    if not diag:
        return
    t = Table(title="int8 error per layer (against fp32; fp32 = kept in fp32)",
              header_style="bold magenta")
    for col in ("layer (ONNX node)", "op", "SQNR dB", "rel. error", "noise added dB", "kept"):
        t.add_column(col, justify="left" if col.startswith("layer") else "right")
    kept = set(diag.get("kept_fp32", []))
    for lay in diag["layers"]:
        t.add_row(lay["node"], lay["op"], f"{lay['sqnr_db']:.1f}", f"{lay['rel_error']:.4f}",
                  f"{lay['added_db']:.1f}", "fp32" if lay["node"] in kept else "int8")
    out.print(t)


def _dry_run(cfg: SearchConfig, teacher, split, suffix: str, space) -> None:
    from ..compress.search import estimate_seconds

    swaps, precs = swaps_for(cfg, teacher), precisions_for(cfg, suffix)
    out.print(f"goal: {cfg.describe_goal()}")
    if space is not None:
        out.print(f"recipe: one candidate, {space[0].label()}")
    else:
        out.print(f"strategy: {cfg.strategy}; architectures: {', '.join(swaps)}; pruning "
                  f"ratios: {', '.join(f'{r:g}' for r in cfg.grid())}; precisions: "
                  f"{', '.join(precs)}")
        out.print(f"fine-tunes (distillation from the input): {cfg.rank_epochs} epochs to "
                  f"rank, {cfg.final_epochs} for finalists, alpha {cfg.distill_alpha:g}; "
                  f"QAT {cfg.qat_epochs} epochs")
    est, per_epoch = estimate_seconds(cfg, teacher, split, len(swaps))
    budget = f"; time budget {cfg.time_budget_s / 60:.1f} min" if cfg.time_budget_s else ""
    out.print(f"estimate: ~{est / 60:.0f} min (~{per_epoch:.1f} s per fine-tune epoch, "
              f"measured on 2 batches){budget}")
