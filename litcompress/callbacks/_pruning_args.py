"""`Pruning`'s target and importance arguments, checked together (they constrain each other through ``pattern``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litcompress._validation import check_choice, check_fraction, fail
from litcompress.schedules import Schedule
from litcompress.selection import check_patterns
from litcompress.sparsity.importance import DATA_DEPENDENT, IMPORTANCES
from litcompress.sparsity.masks import parse_nm

__all__: list[str] = []


def resolve_sparsity(sparsity: Any, pattern: str, scope: Any) -> float | Mapping[str, float]:
    """The final sparsity ``pattern`` asks for: ``sparsity`` itself, or ``1 - N/M`` for an ``N:M`` pattern; every
    combination that cannot be honoured is an error naming the argument."""
    if pattern == "channel":
        fail("pattern", "'unstructured' or an 'N:M' pattern such as '2:4'", pattern,
             hint="whole channels and heads are pruned and removed by the ChannelPruning callback")
    nm = None if pattern == "unstructured" else parse_nm(pattern)
    if nm is not None:
        nm_sparsity = 1 - nm[0] / nm[1]
        if isinstance(sparsity, Mapping) or (sparsity is not None and abs(float(sparsity) - nm_sparsity) > 1e-9):
            fail("sparsity", f"None or {nm_sparsity} with pattern {pattern!r}", sparsity,
                 hint="an N:M pattern fixes the sparsity at 1 - N/M")
        if scope == "global":
            fail("scope", "'layer' with an N:M pattern", scope, hint="N:M prunes every tensor to 1 - N/M")
        return nm_sparsity
    if sparsity is None:
        fail("sparsity", "a float in the [0, 1) range or a mapping of name patterns to floats", sparsity,
             exc=TypeError)
    if isinstance(sparsity, Mapping):
        if not sparsity:
            fail("sparsity", "a non-empty mapping", sparsity)
        if scope == "global":
            fail("scope", "'layer' when `sparsity` is a per-tensor mapping", scope,
                 hint="a global threshold takes one float sparsity")
        for key, value in sparsity.items():
            if not isinstance(key, str):
                fail("sparsity", "a mapping of parameter-name patterns (str) to floats", dict(sparsity),
                     exc=TypeError, hint="e.g. {'encoder': 0.5, 'head': 0.2}")
            check_patterns("sparsity", key)
            check_fraction(f"sparsity[{key!r}]", value)
        return sparsity
    check_fraction("sparsity", sparsity)
    return sparsity


def check_importance(importance: Any, start: Any, schedule: Schedule) -> None:
    """A named importance must exist; a gradient-based one needs an optimizer step before the first prune."""
    if callable(importance):
        return
    check_choice("importance", importance, IMPORTANCES, hint="or pass a callable fn(name, weight)")
    if importance in DATA_DEPENDENT and start == 0 and schedule(0.0) > 0:
        fail("start", f"an int >= 1 with importance={importance!r} and a schedule that prunes at start",
             start, hint="gradient-based scores need at least one optimizer step before the first prune")
