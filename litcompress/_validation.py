"""Argument checks shared by every public entry point.

Every message has the same shape: "Expected argument `x` to be ..., but got ...", followed by a HINT when a
fix is not obvious.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any


def _fail(name: str, expected: str, value: Any, hint: str = "", exc: type[Exception] = ValueError) -> None:
    message = f"Expected argument `{name}` to be {expected}, but got {value!r}."
    if hint:
        message += f" HINT: {hint}"
    raise exc(message)


def _check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, "an int" + (" or None" if allow_none else ""), value, exc=TypeError)
    if minimum is not None and value < minimum:
        _fail(name, f"an int >= {minimum}", value)


def _check_fraction(name: str, value: Any, closed_right: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, "a float", value, exc=TypeError)
    upper_ok = value <= 1 if closed_right else value < 1
    if not (value >= 0 and upper_ok):
        _fail(name, f"a float in the [0, 1{']' if closed_right else ')'} range", value)


def _check_choice(name: str, value: Any, choices: Iterable[str], hint: str = "") -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(name, "one of " + ", ".join(repr(c) for c in choices), value, hint=hint)
