"""Charts of a compression result, saved as PNG (matplotlib, an optional dependency: ``pip install matplotlib``).

- :func:`plot_layers`: per-layer sparsity and bit-width, one bar pair per weight tensor.
- :func:`plot_tradeoff`: accuracy against size on disk, one point per model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from litcompress._extras import require
from litcompress._validation import fail
from litcompress.report.summary import ModelSummary

__all__ = ["plot_layers", "plot_tradeoff"]


def _pyplot() -> ModuleType:
    require("matplotlib", what="Plots")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_layers(summary: ModelSummary, path: str | os.PathLike, title: str = "Per-layer sparsity and bits") -> Path:
    """Bar chart of each weight tensor's sparsity (left axis) and storage bits (right axis).

    Args:
        summary: the model's :func:`~litcompress.report.summarize` result; it must list at least one weight tensor.
        path: the PNG file to write (replaced if it exists; its folder must exist). Returned as a ``Path``.
        title: the chart's title.
    """
    if not summary.layers:
        fail("summary", "a summary with at least one weight tensor", "none", hint="the model has no weights")
    plt = _pyplot()
    names = [layer.name for layer in summary.layers]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], [100 * layer.sparsity for layer in summary.layers], width=0.4, label="sparsity (%)",
           color="tab:blue")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    bits = ax.twinx()
    bits.bar([i + 0.2 for i in x], [layer.bits for layer in summary.layers], width=0.4, label="bits per weight",
             color="tab:orange")
    bits.set_ylabel("bits per weight")
    bits.set_ylim(0, 33)
    ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    ax.set_title(title, pad=24)
    handles = ax.get_legend_handles_labels()[0] + bits.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2,
              frameon=False, fontsize=8)  # between the title and the bars: covers neither
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tradeoff(points: Sequence[tuple[str, float, float]], path: str | os.PathLike, metric: str = "accuracy",
                  title: str = "Accuracy vs size") -> Path:
    """Scatter of ``(label, size in bytes, metric)`` points, size on a log axis.

    Args:
        points: one ``(label, size in bytes, metric value)`` tuple per model, at least one; sizes are plotted in KiB.
        path: the PNG file to write (replaced if it exists; its folder must exist). Returned as a ``Path``.
        metric: the name of the metric, the y axis's label.
        title: the chart's title.
    """
    if not points or not all(len(p) == 3 for p in points):
        fail("points", "a non-empty list of (label, size_bytes, metric) tuples", points)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, size, value in points:
        ax.scatter([size / 1024], [value], s=60)
        ax.annotate(label, (size / 1024, value), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (KiB, log scale)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
