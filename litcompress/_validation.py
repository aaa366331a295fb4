"""Error messages shared by every public entry point (a private module; its names are for the package's own use).

Two forms, so a message says what kind of mistake it is:

- an argument is wrong (raised at construction or at ``setup``, before any training step)::

      Expected argument `x` to be <what is accepted>, but got <value>. HINT: <fix>

- a component is in the wrong state at run time (a layer used before it has what it needs)::

      <what happened> in `<where>`. To fix: <what to do>

>>> try:
...     fail("sparsity", "a float in the [0, 1) range", 1.5)
... except ValueError as err:
...     print(err)
Expected argument `sparsity` to be a float in the [0, 1) range, but got 1.5.
>>> try:
...     fail_state("no activation range has been observed", "net.0:input", "run a training step first")
... except RuntimeError as err:
...     print(err)
no activation range has been observed in `net.0:input`. To fix: run a training step first.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, NoReturn

__all__ = ["check_bool", "check_choice", "check_fraction", "check_int", "check_nonempty_str", "check_real", "fail",
           "fail_state"]


def fail(name: str, expected: str, value: Any, hint: str = "", exc: type[Exception] = ValueError) -> NoReturn:
    """Raise ``exc`` saying that argument ``name`` should be ``expected`` but is ``value``."""
    message = f"Expected argument `{name}` to be {expected}, but got {value!r}."
    if hint:
        message += f" HINT: {hint}"
    raise exc(message)


def fail_state(what: str, where: str, fix: str, exc: type[Exception] = RuntimeError) -> NoReturn:
    """Raise ``exc`` for a run-time state error: what happened, in which component, and what to do."""
    raise exc(f"{what} in `{where}`. To fix: {fix.rstrip('.')}.")


def check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, "an int" + (" or None" if allow_none else ""), value, exc=TypeError)
    if minimum is not None and value < minimum:
        fail(name, f"an int >= {minimum}", value)


def check_real(name: str, value: Any, minimum: float = 0.0, strict: bool = True, allow_none: bool = False) -> None:
    """``value`` is a finite real number ``> minimum`` (``>= minimum`` when not ``strict``): NaN and infinity never
    reach training."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, "a float" + (" or None" if allow_none else ""), value, exc=TypeError)
    number = float(value)
    if not math.isfinite(number):
        fail(name, f"a finite float {'>' if strict else '>='} {minimum:g}", value)
    if not (number > minimum if strict else number >= minimum):
        fail(name, f"a float {'>' if strict else '>='} {minimum:g}", value)


def check_nonempty_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        fail(name, "a non-empty str", value, exc=TypeError)
    if not value:
        fail(name, "a non-empty str", value)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(name, "a bool", value, exc=TypeError)


def check_fraction(name: str, value: Any, closed_right: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, "a float", value, exc=TypeError)
    upper_ok = value <= 1 if closed_right else value < 1
    if value < 0 or not upper_ok:  # NaN fails `upper_ok`
        fail(name, f"a float in the [0, 1{']' if closed_right else ')'} range", value)


def check_choice(name: str, value: Any, choices: Iterable[str], hint: str = "") -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(name, "one of " + ", ".join(repr(c) for c in choices), value, hint=hint)
