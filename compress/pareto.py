"""The search's report files: ``pareto.json`` (every candidate) and ``pareto.png``."""

from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write


def write_json(payload: dict, path: Path, *, force: bool = False) -> Path:
    text = json.dumps(payload, indent=2, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text), force=force)


def write_png(result, path: Path, *, force: bool = False) -> Path:
    """Test accuracy against file size and against latency; the fronts (chosen on
    validation) drawn as lines, the baseline and the chosen model marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    recs, base = [r for r in result.records if "failed" not in r], result.baseline
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for ax, metric, front_key, xlabel in (
        (axes[0], "file_bytes", "size", "file size (KB, log scale)"),
        (axes[1], "latency_ms_median", "latency", "batch-1 latency (ms, log scale)"),
    ):
        scale = 1 / 1024 if metric == "file_bytes" else 1.0
        xs = [r[metric] * scale for r in recs]
        ax.scatter(xs, [r["test_accuracy"] for r in recs], s=18, c="0.6", label="candidate")
        on = [r for r in recs if r["key"] in set(result.fronts.get(front_key, []))]
        ax.plot([r[metric] * scale for r in on], [r["test_accuracy"] for r in on], "o-",
                c="tab:blue", ms=5, label="front (chosen on validation)")
        ax.scatter([base[metric] * scale], [base["test_accuracy"]], marker="s", s=60,
                   c="k", label="input model")
        if result.chosen is not None:
            c = result.chosen
            ax.scatter([c[metric] * scale], [c["test_accuracy"]], marker="*", s=220,
                       c="tab:red", label=f"chosen ({result.status})", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out test top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("torchslim search: left is smaller / faster, up is more accurate")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), force=force)
    finally:
        plt.close(fig)
