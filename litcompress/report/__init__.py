"""Measure and show what compression bought: costs, side-by-side tables, JSON and plots (no Lightning needed)."""

from litcompress.report.plots import plot_layers, plot_tradeoff
from litcompress.report.summary import LayerSummary, ModelSummary, summarize
from litcompress.report.table import compare, deployed_latencies, format_table, speed_change

__all__ = [
    "LayerSummary",
    "ModelSummary",
    "compare",
    "deployed_latencies",
    "format_table",
    "plot_layers",
    "plot_tradeoff",
    "speed_change",
    "summarize",
]
