"""Schedules: pure functions of training progress.

A schedule maps ``progress`` in ``[0, 1]`` (how far training is between a callback's ``start`` and ``end``)
to the fraction of the final value reached by then (for example of the final sparsity). Every schedule
returns 0 or more at progress 0, exactly 1 at progress 1, and never decreases. The callbacks compute
``progress`` from ``trainer.global_step`` with :func:`progress`; nothing here keeps state.

>>> [round(cubic(p), 3) for p in (0.0, 0.25, 0.5, 1.0)]
[0.0, 0.578, 0.875, 1.0]
>>> progress(step=150, start=100, end=300)
0.25
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from litcompress._validation import fail

Schedule = Callable[[float], float]

__all__ = [
    "SCHEDULES",
    "Schedule",
    "cubic",
    "exponential",
    "get_schedule",
    "latest_update",
    "linear",
    "one_shot",
    "progress",
]


def one_shot(progress: float) -> float:
    """Everything at once: the final value from the first update on.

    >>> one_shot(0.0), one_shot(1.0)
    (1.0, 1.0)
    """
    return 1.0


def linear(progress: float) -> float:
    """Grows in proportion to progress.

    >>> linear(0.3)
    0.3
    """
    return float(progress)


def cubic(progress: float) -> float:
    """Gradual magnitude pruning schedule of Zhu & Gupta (2017): fast early, gentle near the end.

    ``s_t = s_f + (s_i - s_f) (1 - progress)^3`` with ``s_i = 0``, expressed as a fraction of ``s_f``.

    >>> cubic(0.5)
    0.875
    """
    return 1.0 - (1.0 - float(progress)) ** 3


def exponential(progress: float, rate: float = 5.0) -> float:
    """Saturating exponential ``(1 - exp(-rate * progress)) / (1 - exp(-rate))``; larger ``rate`` front-loads more.

    >>> round(exponential(0.5), 4)
    0.9241
    """
    if rate <= 0:
        fail("rate", "a float > 0", rate)
    return (1.0 - math.exp(-rate * float(progress))) / (1.0 - math.exp(-rate))


SCHEDULES: dict[str, Schedule] = {
    "one_shot": one_shot,
    "linear": linear,
    "cubic": cubic,
    "exponential": exponential,
}


def progress(step: int, start: int, end: int) -> float:
    """Position of ``step`` between ``start`` and ``end``, clamped to ``[0, 1]``.

    Args:
        step: the current step (for the callbacks: ``trainer.global_step``, in optimizer steps).
        start: the step where progress is 0.
        end: the step where progress reaches 1; when ``end <= start`` progress jumps from 0 to 1 at ``start``.

    >>> progress(0, 10, 20), progress(15, 10, 20), progress(99, 10, 20)
    (0.0, 0.5, 1.0)
    """
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def latest_update(step: int, start: int, end: int, every: int) -> int | None:
    """The last update point at or before ``step``; points are ``start, start + every, ...`` and ``end`` (all in
    optimizer steps). ``None`` before ``start``. A callback updates when this changes.

    Args:
        step: the current optimizer step.
        start: the first update point.
        end: the last update point, an update point even off the ``every`` grid; every step from it on returns it.
        every: optimizer steps between update points from ``start`` on (a positive int).

    >>> [latest_update(s, start=2, end=9, every=3) for s in range(11)]
    [None, None, 2, 2, 2, 5, 5, 5, 8, 9, 9]
    """
    if step < start:
        return None
    if step >= end:
        return end
    return start + (step - start) // every * every


def get_schedule(schedule: str | Schedule, name: str = "schedule") -> Schedule:
    """Resolve a schedule name, or check a user callable, and return the function.

    A callable is probed on a grid of progress values: it must return floats in ``[0, 1]``, never decrease,
    and return exactly 1 at progress 1 (so the final target is always reached).

    >>> get_schedule("linear") is linear
    True
    >>> get_schedule("quadratic")
    Traceback (most recent call last):
    ...
    ValueError: Expected argument `schedule` to be one of 'one_shot', ..., but got 'quadratic'.
    """
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            fail(name, "one of " + ", ".join(map(repr, SCHEDULES)) + " or a callable progress -> fraction", schedule)
        return SCHEDULES[schedule]
    if not callable(schedule):
        fail(name, "a schedule name or a callable progress -> fraction", schedule, exc=TypeError)
    grid = [i / 64 for i in range(65)]
    try:
        values = [float(schedule(p)) for p in grid]
    except Exception as err:  # the user's function failed on a plain float: say which argument it was
        raise TypeError(f"Expected argument `{name}` to be a callable taking a float progress, but calling it "
                        f"failed with {err!r}. HINT: it is called as fn(progress) with progress in [0, 1]") from err
    if any(not (0.0 <= v <= 1.0) for v in values):
        fail(name, "a callable returning values in [0, 1]", schedule, hint=f"it returned {values!r}")
    if any(b < a for a, b in itertools.pairwise(values)):
        fail(name, "a non-decreasing callable", schedule, hint="a mask can only grow sparser over time")
    if values[-1] != 1.0:
        fail(name, "a callable returning exactly 1.0 at progress 1.0", schedule, hint=f"it returned {values[-1]}")
    return schedule
