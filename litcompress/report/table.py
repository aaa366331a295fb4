"""`compare` and `format_table`: two models' costs and metrics side by side, with after/before ratios.

>>> import torch
>>> from torch import nn
>>> from litcompress.report import summarize
>>> dense = summarize(nn.Linear(64, 10), torch.randn(1, 64), latency=False)
>>> rows = compare(dense, dense, {"val/acc": 0.9}, {"val/acc": 0.88})
>>> [(r["name"], r["ratio"]) for r in rows][:2]
[('parameters', 1.0), ('nonzero parameters', 1.0)]
>>> print(format_table(rows, use_rich=False).splitlines()[-1])
val/acc                    |      0.9000 |      0.8800 | 0.978x
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from litcompress._validation import fail
from litcompress.report.summary import ModelSummary

__all__ = ["compare", "deployed_latencies", "format_table", "speed_change"]

_ROWS: tuple[tuple[str, str, str], ...] = (
    ("parameters", "parameters", "int"),
    ("nonzero parameters", "nonzero", "int"),
    ("sparsity", "sparsity", "pct"),
    ("bits per weight", "bits_per_weight", "float"),
    ("size, compact file (bytes)", "compact_bytes", "bytes"),
    ("size, fp32 file (bytes)", "fp32_bytes", "bytes"),
    ("FLOPs per batch", "flops", "int"),
    ("FLOPs skipping zeros", "sparse_flops", "int"),
    ("latency, torch eager (ms)", "latency_eager", "ms"),
    ("latency, ONNX Runtime, deployed (ms)", "latency_onnx", "ms"),
    ("latency, ORT, all-int8 export (ms)", "latency_onnx_int8", "ms"),
    ("latency, ORT, fp32 export (ms)", "latency_onnx_fp32", "ms"),
)
SPEED_ROW = "speed, after vs before"


def compare(before: ModelSummary, after: ModelSummary, metrics_before: Mapping[str, float | None] | None = None,
            metrics_after: Mapping[str, float | None] | None = None) -> list[dict[str, Any]]:
    """Rows of ``{"name", "before", "after", "ratio", "kind"}``; ``ratio`` is after / before, ``None`` if unknown.

    A row named ``"speed, after vs before"`` (kind ``"text"``) says how the deployed latencies compare (see
    :func:`deployed_latencies`): ``"2.0x faster"``, ``"about the same speed"`` or ``"3.6x slower"``; its ``before``
    cell says which latencies were compared.

    Args:
        before: the reference model's summary (:func:`~litcompress.report.summarize`), e.g. the teacher or the
            dense model; a figure neither summary has (``None`` in both, e.g. no ONNX latency) gets no row.
        after: the compressed model's summary.
        metrics_before: the reference model's metrics by name (e.g. ``{"val/acc": 0.9}``); default: none. A
            value of ``None`` is shown as unknown.
        metrics_after: the compressed model's metrics by name; default: none. One row per metric name in either
            mapping (first seen first), unknown on the side that lacks it.
    """
    rows = []
    for label, attr, kind in _ROWS:
        a, b = getattr(before, attr), getattr(after, attr)
        if a is None and b is None:
            continue
        ratio = None if kind == "pct" else _ratio(a, b)  # a share is compared by its values, not their ratio
        rows.append({"name": label, "before": a, "after": b, "ratio": ratio, "kind": kind})
    speed = deployed_latencies(before, after)
    if speed is not None:  # how the deployed models compare, in words: "3.6x slower"
        where, a, b = speed
        rows.append({"name": SPEED_ROW, "before": where, "after": speed_change(a, b), "ratio": None, "kind": "text"})
    metrics_before, metrics_after = metrics_before or {}, metrics_after or {}
    for key in dict.fromkeys([*metrics_before, *metrics_after]):
        a, b = metrics_before.get(key), metrics_after.get(key)
        rows.append({"name": key, "before": a, "after": b, "ratio": _ratio(a, b), "kind": "metric"})
    return rows


def deployed_latencies(before: ModelSummary, after: ModelSummary) -> tuple[str, float, float] | None:
    """The latencies of what each model would deploy, as ``(where, before, after)`` in seconds: ONNX Runtime when both
    were timed there (``latency_onnx``: for a quantized model, its export with int8 where it pays), else torch eager
    (for a quantized model that runs fake quantization, not what it deploys); ``None`` when either was not timed.

    >>> from litcompress.report import ModelSummary
    >>> fast, slow = (ModelSummary(1, 1, 32.0, 4, 4, 2, 2, 8, latency_eager=t) for t in (0.002, 0.005))
    >>> deployed_latencies(fast, slow)
    ('torch eager', 0.002, 0.005)
    """
    if before.latency_onnx and after.latency_onnx:
        return "ONNX Runtime", before.latency_onnx, after.latency_onnx
    if before.latency_eager and after.latency_eager:
        return "torch eager", before.latency_eager, after.latency_eager
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "text":
        return str(value)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ms":
        return f"{1e3 * value:.3f}"
    if kind in ("int", "bytes"):
        return f"{int(value):,}"
    if kind == "float":
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_table(rows: list[dict[str, Any]], title: str = "Compression report", before: str = "before",
                 after: str = "after", use_rich: bool | None = None) -> str:
    """The rows as a table: with ``rich`` when it is installed (or ``use_rich=True``), plain text otherwise.

    Args:
        rows: the rows of :func:`compare`.
        title: the table's title (its first line in plain text).
        before: the header of the reference column.
        after: the header of the compressed column.
        use_rich: ``True`` draws with ``rich`` (which must be installed), ``False`` in plain text; ``None``, the
            default, uses ``rich`` when it can be imported.
    """
    cells = [(r["name"], _cell(r["before"], r["kind"]), _cell(r["after"], r["kind"]),
              "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}x") for r in rows]
    if use_rich is None:
        try:
            import rich  # noqa: F401

            use_rich = True
        except ImportError:
            use_rich = False
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, header in enumerate(("", before, after, "after / before")):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*row)
        buffer = io.StringIO()
        Console(file=buffer, width=100, force_terminal=False).print(table)
        return buffer.getvalue().rstrip()
    widths = [max(len(c[i]) for c in [("", before, after, "after / before"), *cells]) for i in range(4)]
    widths = [max(widths[0], 26), max(widths[1], 11), max(widths[2], 11), widths[3]]
    lines = [title, " | ".join(h.rjust(w) if i else h.ljust(w)
                               for i, (h, w) in enumerate(zip(("", before, after, "after / before"), widths)))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
              for row in cells]
    return "\n".join(lines)


def speed_change(before: float, after: float) -> str:
    """How ``after`` compares with ``before`` (two latencies, same unit), in words a table can print.

    >>> speed_change(5.0, 2.5), speed_change(0.75, 2.55), speed_change(1.0, 1.01)
    ('2.0x faster', '3.4x slower', 'about the same speed')
    """
    if not (before > 0 and after > 0):
        fail("after", "two positive latencies", (before, after))
    ratio = before / after
    if ratio >= 1.05:
        return f"{ratio:.1f}x faster"
    if ratio <= 1 / 1.05:
        return f"{1 / ratio:.1f}x slower"
    return "about the same speed"
