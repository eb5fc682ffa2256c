"""Turn measurement records into a rich table, markdown, csv or json: one record, many views."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table as _RichTable
from rich.text import Text
from tabulate import tabulate

from ..compress.quantize import rate_speedups

# --- one rendering rule ----------------------------------------------------------------
# Every string that comes from a file, a path or the environment is shown as text, never
# markup, with control characters made visible: a model name holding ESC sequences must not
# retitle or clear the terminal, and a "[/x]" in a path must not crash rich.
# C0 and C1 controls, DEL, and the bidi overrides that reorder what a reader sees.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_MULTILINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029"
                                "\u202a-\u202e\u2066-\u2069]")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe_text(value: Any, *, multiline: bool = False) -> str:
    """``value`` as one line of plain text: control characters (newlines too, unless
    ``multiline``) replaced by visible escapes, ESC shown as ``\\x1b``."""
    return (_CONTROL_MULTILINE if multiline else _CONTROL).sub(_visible, str(value))


def safe_markup(value: Any) -> str:
    """``value`` to put inside a rich markup string: escaped, so it prints as it reads."""
    return escape(safe_text(value))


def as_text(value: Any) -> Any:
    """A table cell or title: a str becomes rich Text (never parsed as markup)."""
    return Text(safe_text(value)) if isinstance(value, str) else value


class Table(_RichTable):
    """rich's Table whose string cells, title and caption are text, not markup."""

    def __init__(self, *args, title=None, caption=None, **kwargs):
        super().__init__(*args, title=as_text(title), caption=as_text(caption), **kwargs)

    def add_row(self, *cells, **kwargs) -> None:
        super().add_row(*(as_text(c) for c in cells), **kwargs)


def _safe_rows(body) -> list[list[str]]:
    return [[safe_text(c) for c in line] for line in body]


# (key, header, formatter); the ratio columns are added when there is a baseline.
COLUMNS: list[tuple[str, str, Any]] = []


def fmt_count(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_cv(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


COLUMNS = [
    ("model", "model", str),
    ("runtime", "runtime", lambda v: v or "-"),
    ("params", "params", fmt_count),
    ("nonzero_params", "non-zero", fmt_count),
    ("file_bytes", "file", fmt_bytes),
    ("compressed_bytes", "gzip", fmt_bytes),
    ("macs", "MACs", fmt_count),
    ("latency_ms_median", "ms b1 (median)", fmt_ms),
    ("latency_ms_p90", "ms b1 (p90)", fmt_ms),
    ("batch_latency_ms_median", "ms bN (median)", fmt_ms),
    ("accuracy", "top-1 %", fmt_pct),
    ("top5", "top-5 %", fmt_pct),
    ("throughput_per_s", "items/s bN", fmt_rate),
    ("fidelity_top1_agreement", "agrees % vs row 1", fmt_pct),
    ("fidelity_rel_error", "rel. error vs row 1", lambda v: "-" if v is None else f"{v:.4f}"),
]
# The terminal table leaves these to markdown/csv/json, to stay readable at ~120 columns.
FULL_ONLY = {"batch_latency_ms_median", "top5", "throughput_per_s",
             "speedup_vs_fp32_same_runtime"}
SPARSE_ONLY = {"nonzero_params", "compressed_bytes"}  # shown when some model has zeros


def _ratio(base: float | None, value: float | None) -> float | None:
    if not base or not value:
        return None
    return base / value


def with_ratios(rows: Sequence[dict]) -> list[dict]:
    """Add ``x smaller / x fewer MACs / x faster / accuracy change`` against the first row."""
    if len(rows) < 2:
        return [dict(r) for r in rows]
    base = rows[0]
    out = []
    for r in rows:
        r = dict(r)
        r["size_ratio"] = _ratio(base.get("file_bytes"), r.get("file_bytes"))
        r["macs_ratio"] = _ratio(base.get("macs"), r.get("macs"))
        r["speedup"] = _ratio(base.get("latency_ms_median"), r.get("latency_ms_median"))
        acc, base_acc = r.get("accuracy"), base.get("accuracy")
        r["accuracy_delta"] = None if acc is None or base_acc is None else acc - base_acc
        out.append(r)
    rate_speedups(out, baseline=baseline_rows(out))
    return out


def baseline_rows(rows: Sequence[dict]) -> list[dict]:
    """The first model in every runtime it was measured in: what the speed-ups stand on."""
    return [r for r in rows if r.get("model") == rows[0].get("model")] if rows else []


def _label(row: dict) -> str:
    return " ".join(str(row[k]) for k in ("precision", "runtime") if row.get(k))


def _fastest_fp32(rows: Sequence[dict]) -> dict | None:
    fp32 = [r for r in baseline_rows(rows)
            if r.get("precision") == "fp32" and r.get("latency_ms_median")]
    return min(fp32, key=lambda r: r["latency_ms_median"], default=None)


def _ratio_columns(rows: Sequence[dict]) -> list[tuple[str, str, Any]]:
    """Each "x faster" header names its baseline: row 1, and the fastest fp32 runtime of the
    first model when it was measured in several runtimes."""
    fastest = _fastest_fp32(rows)
    runtimes = {r.get("runtime") for r in baseline_rows(rows)}
    cols = [
        ("size_ratio", "x smaller", fmt_x),
        ("macs_ratio", "x fewer MACs", fmt_x),
        ("speedup", f"x faster vs {_label(rows[0]) or 'row 1'}", fmt_x),
    ]
    if fastest is not None and len(runtimes) > 1:
        cols.append(("speedup_vs_fastest_fp32",
                     f"x faster vs fastest fp32 ({fastest.get('runtime')})", fmt_x))
    cols += [("speedup_vs_fp32_same_runtime", "x faster vs fp32 same runtime", fmt_x),
             ("accuracy_delta", "Δ top-1", lambda v: "-" if v is None else f"{v:+.2f}")]
    return cols


def speedup_note(rows: Sequence[dict]) -> str | None:
    """One sentence under a table saying what each "x faster" is measured against."""
    if len(rows) < 2:
        return None
    base = rows[0]
    text = (f"x faster: batch-1 median latency against row 1 ({base.get('model')}, "
            f"{_label(base)}, {fmt_ms(base.get('latency_ms_median'))} ms)")
    fastest = _fastest_fp32(rows)
    if fastest is not None and len({r.get("runtime") for r in baseline_rows(rows)}) > 1:
        text += (f"; vs fastest fp32: against {fastest.get('model')} in "
                 f"{fastest.get('runtime')} ({fmt_ms(fastest.get('latency_ms_median'))} ms), "
                 "the fastest fp32 runtime measured here")
    return text


def _sparse(rows: Sequence[dict]) -> bool:
    return any((r.get("nonzero_params") or 0) < 0.95 * (r.get("params") or 0) for r in rows)


def _columns(rows: Sequence[dict], compact: bool) -> list[tuple[str, str, Any]]:
    """Drop columns that are empty for every row (e.g. accuracy without data)."""
    cols = COLUMNS + (_ratio_columns(rows) if len(rows) > 1 else [])
    if compact:
        hide = FULL_ONLY | (set() if _sparse(rows) else SPARSE_ONLY)
        cols = [c for c in cols if c[0] not in hide]
    return [c for c in cols if any(r.get(c[0]) is not None for r in rows) or c[0] == "model"]


def table_rows(rows: Sequence[dict], compact: bool = False):
    """(headers, body) of formatted cells, ratios against the first row included."""
    rows = with_ratios(rows)
    cols = _columns(rows, compact)
    return [h for _, h, _ in cols], _safe_rows([f(r.get(k)) for k, _, f in cols] for r in rows)


def rich_table(rows: Sequence[dict], title: str | None = None) -> Table:
    headers, body = table_rows(rows, compact=True)
    table = Table(title=title, header_style="bold cyan", caption=speedup_note(rows),
                  caption_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for line in body:
        table.add_row(*line)
    return table


def render_text(rows: Sequence[dict], fmt: str) -> str:
    """markdown / csv / json text for ``rows`` (json keeps raw numbers and adds ratios)."""
    if fmt == "json":
        return json.dumps(with_ratios(rows), indent=2, default=str)
    if fmt == "csv":
        full = with_ratios(rows)
        keys = list(dict.fromkeys(k for r in full for k in r if not isinstance(r[k], dict | list)))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: safe_text(v) if isinstance(v, str) else v for k, v in r.items()}
                         for r in full)
        return buf.getvalue()
    headers, body = table_rows(rows)
    note = speedup_note(rows)
    note = safe_text(note) if note else None
    return tabulate(body, headers=headers, tablefmt="github") + (f"\n\n{note}" if note else "")


def _changed(method: str, cfg: dict) -> dict:
    """The config values that differ from the method's defaults: what the user chose."""
    import dataclasses

    from ..compress.config import METHODS

    cls = METHODS.get(method)
    if cls is None:
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    norm = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    primary = dataclasses.fields(cls)[0].name  # conv / mode / epochs ...: always worth showing
    return {k: v for k, v in cfg.items() if k == primary or k not in norm or norm[k] != v}


def history_rows(history: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """A file's compression history as table rows: step, method, key config, before -> after."""
    headers = ["#", "method", "config", "params", "MACs", "top-1 %", "when"]
    body = []
    for i, h in enumerate(history, 1):
        cfg = {k: v for k, v in (h.get("config") or {}).items() if k != "method"}
        cfg = _changed(h.get("method", ""), cfg)
        b, a = h.get("before") or {}, h.get("after") or {}
        body.append([
            str(i),
            h.get("method", "?"),
            ", ".join(f"{k}={v}" for k, v in cfg.items() if v not in (None, "", [], ()))[:70],
            f"{fmt_count(b.get('params'))} -> {fmt_count(a.get('params'))}",
            f"{fmt_count(b.get('macs'))} -> {fmt_count(a.get('macs'))}",
            f"{fmt_pct(b.get('accuracy'))} -> {fmt_pct(a.get('accuracy'))}",
            (h.get("time") or "")[:19],
        ])
    return headers, _safe_rows(body)


def rich_history(name: str, history: Sequence[dict]) -> Table:
    headers, body = history_rows(history)
    table = Table(title=f"history of {name} (as stated by the file)", header_style="bold magenta")
    for h in headers:
        table.add_column(h)
    for line in body:
        table.add_row(*line)
    return table


# ---------------------------------------------------------------------------- statistics

STATS_COLUMNS: list[tuple[str, str, Any]] = [
    ("model", "model", str),
    ("runtime", "runtime", lambda v: v or "-"),
    ("cold_ms", "cold ms", fmt_ms),
    ("latency_ms_min", "min", fmt_ms),
    ("latency_ms_median", "median", fmt_ms),
    ("latency_ms_mean", "mean", fmt_ms),
    ("latency_ms_p90", "p90", fmt_ms),
    ("latency_ms_p95", "p95", fmt_ms),
    ("latency_ms_p99", "p99", fmt_ms),
    ("latency_cv", "CV %", fmt_cv),
    ("latency_runs", "runs", fmt_count),
    ("latency_seconds", "s", lambda v: "-" if v is None else f"{v:.2f}"),
    ("batch_latency_ms_median", "bN median", fmt_ms),
    ("batch_latency_cv", "bN CV %", fmt_cv),
    ("throughput_per_s", "items/s bN", fmt_rate),
    ("peak_rss_delta_bytes", "peak RSS +", fmt_bytes),
]


def stats_rows(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Latency statistics: the cold first call apart, then the timed calls' distribution."""
    cols = [c for c in STATS_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    return [h for _, h, _ in cols], _safe_rows([f(r.get(k)) for k, _, f in cols] for r in rows)


def stats_title(rows: Sequence[dict]) -> str:
    batch = rows[0].get("batch_size") if rows else None
    return (f"latency statistics (ms, batch 1; bN = batch {batch}; cold = the first call; "
            "CV = std / mean of the timed calls)")


def env_line(env: dict) -> str:
    """The machine and libraries behind the figures, in one line."""
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx": "AMX"}
    have = [t for k, t in names.items() if env.get(k)]
    lack = [t for k, t in names.items() if k in env and not env.get(k) and k != "avx2"]
    isa = ", ".join(have) or "no AVX2"
    if lack:
        isa += f" (no {', '.join(lack)})"
    ort = f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""
    return (f"{env.get('cpu', 'cpu')}; {isa}; {env.get('threads')} thread(s); "
            f"torch {env.get('torch', '?')}{ort}")


# ---------------------------------------------------------------------------- layers

LAYER_COLUMNS: list[tuple[str, str, Any]] = [
    ("name", "layer", str),
    ("type", "type", str),
    ("precision", "precision", lambda v: v or "-"),
    ("params", "params", fmt_count),
    ("macs", "MACs", fmt_count),
    ("bytes", "weights", fmt_bytes),
    ("ms", "ms", lambda v: "-" if v is None else f"{v:.4f}"),
    ("share", "% time", lambda v: "-" if v is None else f"{v:.1f}"),
]


def _sum(values) -> int | float | None:
    """A count's sum: unknown (None) when any part is unknown."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _sum_known(values) -> float | None:
    """A time's sum over the parts that were timed."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _merged(name: str, rows: Sequence[dict]) -> dict:
    out = {"name": name, "type": "", "precision": None}
    out.update({k: _sum(r.get(k) for r in rows) for k in ("params", "macs", "bytes")})
    out.update({k: _sum_known(r.get(k) for r in rows) for k in ("ms", "share")})
    return out


def top_layers(layers: dict, top: int) -> list[dict]:
    """The ``top`` slowest rows, then one "rest" row that adds up all the others."""
    rows = list(layers["rows"])
    if top <= 0 or len(rows) <= top + 1:
        return rows
    rest = rows[top:]
    return [*rows[:top], _merged(f"rest ({len(rest)} layers)", rest)]


def layer_rows(layers: dict, top: int) -> tuple[list[str], list[list[str]]]:
    rows = top_layers(layers, top)
    cols = [c for c in LAYER_COLUMNS if c[0] != "precision" or any(r.get("precision")
                                                                    for r in rows)]
    total = _merged("total", layers["rows"])
    body = [[f(r.get(k)) for k, _, f in cols] for r in [*rows, total]]
    return [h for _, h, _ in cols], _safe_rows(body)


def layer_summary(record: dict) -> list[str]:
    """What the profile adds up to, against the whole-model figures."""
    lay = record["layers"]
    median = lay.get("whole_model_median_ms")
    lines = [f"layers add up to {lay['total_ms']:.4f} ms"
             + (f" = {100 * lay['total_ms'] / median:.1f} % of the whole-model median "
                f"{median:.4f} ms (% time is of that median)" if median else "")
             + f"; {lay['tool']}, {lay['runs']} runs, mean of the runs around the median"]
    macs = record.get("macs")
    if macs is not None:
        same = "= the model's MACs" if lay["macs_total"] == macs else \
            f"!= the model's {fmt_count(macs)} MACs"
        lines.append(f"MACs column sums to {lay['macs_total']:,} {same}")
    by = lay.get("by_precision") or {}
    if "int8" in by or "q/dq" in by:
        total = median or lay["total_ms"] or 1.0
        parts = [f"{p}: {v['nodes']} nodes, {100 * v['ms'] / total:.1f} % of time"
                 for p, v in sorted(by.items())]
        lines.append("; ".join(parts))
        lines.append(f"Q/DQ overhead: {lay.get('qdq_ms', 0.0):.4f} ms "
                     f"({100 * lay.get('qdq_ms', 0.0) / total:.1f} %); fp32 compute nodes "
                     f"(fallbacks): {', '.join(lay.get('fp32_compute') or []) or 'none'}")
    return lines + list(lay.get("notes") or [])


def compare_layer_rows(a: dict, b: dict, top: int) -> tuple[list[str], list[list[str]]]:
    """Two profiles lined up by layer name (e.g. before and after pruning); a layer in only
    one of them gets "-" on the other side. Ordered by the first one's time."""
    rows_a = {r["name"]: r for r in a["layers"]["rows"]}
    rows_b = {r["name"]: r for r in b["layers"]["rows"]}
    names = list(rows_a) + [n for n in rows_b if n not in rows_a]
    shown = names[:top] if top > 0 and len(names) > top + 1 else names
    headers = ["layer", "type", "ms A", "ms B", "x faster (B vs A)", "MACs A", "MACs B",
               "params A", "params B"]
    body = []
    for n in shown:
        ra, rb = rows_a.get(n, {}), rows_b.get(n, {})
        body.append([n, ra.get("type") or rb.get("type") or "", fmt_ms4(ra.get("ms")),
                     fmt_ms4(rb.get("ms")), fmt_x(_ratio(ra.get("ms"), rb.get("ms"))),
                     fmt_count(ra.get("macs")), fmt_count(rb.get("macs")),
                     fmt_count(ra.get("params")), fmt_count(rb.get("params"))])
    rest = names[len(shown):]
    if rest:
        ms_a = _sum_known(rows_a[n]["ms"] for n in rest if n in rows_a)
        ms_b = _sum_known(rows_b[n]["ms"] for n in rest if n in rows_b)
        body.append([f"rest ({len(rest)} layers)", "", fmt_ms4(ms_a), fmt_ms4(ms_b),
                     fmt_x(_ratio(ms_a, ms_b)), "", "", "", ""])
    ta, tb = a["layers"]["total_ms"], b["layers"]["total_ms"]
    body.append(["total", "", fmt_ms4(ta), fmt_ms4(tb), fmt_x(_ratio(ta, tb)),
                 fmt_count(a["layers"]["macs_total"]), fmt_count(b["layers"]["macs_total"]),
                 "", ""])
    return headers, _safe_rows(body)


def fmt_ms4(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def layers_csv(records: Sequence[dict]) -> str:
    """Every layer of every record, one csv row each."""
    keys = ["model", "runtime", "name", "type", "precision", "params", "macs", "bytes", "ms",
            "share", "calls"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for rec in records:
        for r in rec["layers"]["rows"]:
            row = {"model": rec["model"], "runtime": rec["runtime"], **r}
            writer.writerow({k: safe_text(v) if isinstance(v, str) else v
                             for k, v in row.items()})
    return buf.getvalue().rstrip("\r\n")
