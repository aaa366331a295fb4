"""Latency measurement shared by the report and the int8 choice (a private module; its names are for the package's
own use): the median of timed calls, an ONNX Runtime session with a fixed thread count and its input feed, and
the latencies of several files timed in turns.

>>> median_seconds(lambda: sum(range(100)), repeats=3, warmup=1) > 0
True
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["median_seconds", "ort_feed", "ort_latencies", "ort_session"]


@torch.inference_mode()
def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """The median wall-clock seconds of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls.

    Args:
        fn: the call to time, without arguments; it runs under ``torch.inference_mode()``.
        repeats: timed calls (at least 1: the median of none is an error).
        warmup: untimed calls first (0 for none).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_session(path: str | os.PathLike, threads: int, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads, its other options as deployed.

    ``spinning=False`` lets idle intra-op threads sleep at once instead of spinning for more work: several sessions
    timed in turn then do not slow each other, and another process on the machine distorts the timings far less
    (measured on 2 shared cores: the same fp32 file 1.1-6.3 ms with spinning, 1.5-2.7 ms without).

    Args:
        path: the ONNX file.
        threads: ONNX Runtime's intra-op thread count (0 lets ONNX Runtime choose).
        spinning: let idle intra-op threads spin (ONNX Runtime's default); ``False`` makes them sleep at once.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> dict[str, Any]:
    """The session's inputs, by name, as numpy arrays: positional tensors in order, keyword tensors by name.

    Args:
        session: an ONNX Runtime ``InferenceSession``.
        args: input tensors matched to the session's inputs in order; when not empty, ``kwargs`` is ignored.
        kwargs: input tensors by input name, used when ``args`` is empty: it must hold every input of the session.
    """
    names = [i.name for i in session.get_inputs()]
    values = dict(zip(names, args)) if args else {n: kwargs[n] for n in names}
    return {name: value.detach().cpu().numpy() for name, value in values.items()}


def ort_latencies(paths: Sequence[str | os.PathLike], args: tuple[Tensor, ...], kwargs: dict[str, Tensor],
                  threads: int, repeats: int, warmup: int, rounds: int) -> list[float]:
    """Median seconds per run of each file in ONNX Runtime on one input, the files taking turns: in each of
    ``rounds`` rounds (every other one in reverse order) every file runs ``warmup`` + ``repeats`` times in a block;
    a file's latency is the median of its rounds' medians. The sessions do not spin (see :func:`ort_session`): an
    idle session's spinning threads would slow the next one's runs."""
    sessions = [ort_session(path, threads, spinning=False) for path in paths]
    feeds = [ort_feed(session, args, kwargs) for session in sessions]
    samples: list[list[float]] = [[] for _ in paths]
    order = list(range(len(paths)))
    for round_ in range(rounds):
        for i in order if round_ % 2 == 0 else order[::-1]:
            samples[i].append(median_seconds(functools.partial(sessions[i].run, None, feeds[i]), repeats, warmup))
    return [statistics.median(s) for s in samples]
