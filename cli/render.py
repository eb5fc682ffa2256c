"""Turn measurement records into a rich table, markdown, csv or json: one record, many views."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from tabulate import tabulate

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
    ("fidelity_top1_agreement", "agrees %", fmt_pct),
    ("fidelity_rel_error", "rel. error", lambda v: "-" if v is None else f"{v:.4f}"),
]
# The terminal table leaves these to markdown/csv/json, to stay readable at ~120 columns.
FULL_ONLY = {"batch_latency_ms_median", "top5"}
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
    return out


RATIO_COLUMNS = [
    ("size_ratio", "x smaller", lambda v: "-" if v is None else f"{v:.2f}x"),
    ("macs_ratio", "x fewer MACs", lambda v: "-" if v is None else f"{v:.2f}x"),
    ("speedup", "x faster b1", lambda v: "-" if v is None else f"{v:.2f}x"),
    ("accuracy_delta", "Δ top-1", lambda v: "-" if v is None else f"{v:+.2f}"),
]


def _sparse(rows: Sequence[dict]) -> bool:
    return any((r.get("nonzero_params") or 0) < 0.95 * (r.get("params") or 0) for r in rows)


def _columns(rows: Sequence[dict], compact: bool) -> list[tuple[str, str, Any]]:
    """Drop columns that are empty for every row (e.g. accuracy without data)."""
    cols = COLUMNS + (RATIO_COLUMNS if len(rows) > 1 else [])
    if compact:
        hide = FULL_ONLY | (set() if _sparse(rows) else SPARSE_ONLY)
        cols = [c for c in cols if c[0] not in hide]
    return [c for c in cols if any(r.get(c[0]) is not None for r in rows) or c[0] == "model"]


def table_rows(rows: Sequence[dict], compact: bool = False):
    """(headers, body) of formatted cells, ratios against the first row included."""
    rows = with_ratios(rows)
    cols = _columns(rows, compact)
    return [h for _, h, _ in cols], [[f(r.get(k)) for k, _, f in cols] for r in rows]


def rich_table(rows: Sequence[dict], title: str | None = None) -> Table:
    headers, body = table_rows(rows, compact=True)
    table = Table(title=title, header_style="bold cyan")
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
        writer.writerows(full)
        return buf.getvalue()
    headers, body = table_rows(rows)
    return tabulate(body, headers=headers, tablefmt="github")


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
    return headers, body


def rich_history(name: str, history: Sequence[dict]) -> Table:
    headers, body = history_rows(history)
    table = Table(title=f"history of {name}", header_style="bold magenta")
    for h in headers:
        table.add_column(h)
    for line in body:
        table.add_row(*line)
    return table
