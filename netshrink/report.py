"""The run report: the stage table (like Table 1 of Deep Compression), the per-layer table (like its
Table 2), Huffman against the entropy bound, and PNG plots (weights before/after sharing, sparsity)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._extras import require
from ._fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger("netshrink.report")

STAGE_COLUMNS = ("stage", "test error", "params", "non-zeros", "bits/nz", "bytes", "ratio")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def stage_cells(row: Any) -> list[str]:
    return [
        row.stage,
        f"{100 * row.test_error:.2f}%" if getattr(row, "metric", "error") == "error" else f"{row.metric} {row.test_error:.4g}",
        _fmt_int(row.params),
        _fmt_int(row.nonzeros),
        f"{row.bits_per_nonzero:.2f}",
        _fmt_int(row.bytes),
        f"{row.ratio:.1f}x",
    ]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table; a ``|`` inside a cell is escaped so that it cannot split its row."""
    rows = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain aligned table for the terminal."""
    rows = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def stage_table(rows: Sequence[Any], markdown: bool = True) -> str:
    render = markdown_table if markdown else text_table
    return render(STAGE_COLUMNS, [stage_cells(r) for r in rows])


def plot_weight_sharing(snapshots: dict[str, dict[str, list[float]]], path: Path, layer: str | None = None) -> Path | None:
    """Histogram of one layer's non-zero weights before and after weight sharing (the paper's Fig. 4)."""
    if not snapshots:
        return None
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    before, after = snapshots["before"], snapshots["after"]
    layer = layer or max(before, key=lambda n: len(before[n]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    axes[0].hist(before[layer], bins=200, color="#4477aa")
    axes[0].set_title(f"{layer}: before sharing ({len(before[layer]):,} non-zeros)")
    values, counts = np.unique(np.asarray(after[layer], dtype=np.float32), return_counts=True)
    axes[1].bar(values, counts, width=(values.max() - values.min()) / 200 if values.size > 1 else 0.01, color="#cc6677")
    axes[1].set_title(f"{layer}: after sharing ({values.size} distinct values)")
    for ax in axes:
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _save_figure(fig, path: Path) -> None:
    """PNG bytes rendered in memory, then written atomically (a killed run never leaves half a picture)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def plot_sparsity(layers: Sequence[tuple[str, int, int]], path: Path) -> Path:
    """Bar plot of the share of weights kept per layer; ``layers`` = (name, weights, non-zeros)."""
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in layers]
    kept = [100.0 * nz / max(1, total) for _, total, nz in layers]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.6))
    bars = ax.bar(names, kept, color="#228833")
    for b, k in zip(bars, kept):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{k:.1f}%", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("weights kept (%)")
    ax.set_ylim(0, max(kept + [1.0]) * 1.15)
    ax.set_title("Non-zero weights per layer")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def write_markdown(path: Path, sections: Sequence[tuple[str, str]], title: str) -> Path:
    body = [f"# {title}", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    atomic_write_text(path, "\n".join(body))
    return path
