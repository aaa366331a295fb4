"""Optimizers that follow a model whose structure changed mid-fit (channels removed, layers factorized).

A structural change replaces ``Parameter`` objects: the optimizer would keep stepping the old ones and the model
would train nothing. :func:`replace_parameters` edits each optimizer in place instead of building a new one, so
the LR scheduler (which holds the optimizer), the param groups' hyperparameters and the state of every untouched
parameter stay as they were. A replaced parameter's state (momentum, Adam moments, step count) is carried to its
successor through a ``carry`` function (e.g. the kept slices, :func:`keep_slices`); a successor without one, or
whose predecessor's state is not shaped like the parameter (factored statistics), starts fresh, as a newly added
parameter does.

>>> import torch
>>> from torch import nn
>>> old = nn.Parameter(torch.ones(4, 3))
>>> opt = torch.optim.SGD([old], lr=0.1, momentum=0.9)
>>> old.grad = torch.arange(12.0).reshape(4, 3)
>>> opt.step()
>>> new = nn.Parameter(old.detach()[[0, 2]].clone())
>>> replace_parameters([opt], {old: [(new, keep_slices({0: torch.tensor([0, 2])}))]})
1
>>> opt.param_groups[0]["params"][0] is new, opt.state[new]["momentum_buffer"].tolist()
(True, [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Carry", "keep_slices", "replace_parameters"]

Carry = Callable[[Tensor], Tensor]
"""Maps a state tensor shaped like the old parameter to one shaped like the new parameter."""


def keep_slices(kept: Mapping[int, Tensor]) -> Carry:
    """A :data:`Carry` that keeps the positions ``kept[dim]`` along each ``dim`` (``index_select``, in order)."""
    def carry(t: Tensor) -> Tensor:
        for dim, index in sorted(kept.items()):
            t = t.index_select(dim, index.to(t.device))
        return t.clone()

    return carry


def replace_parameters(
    optimizers: Iterable[torch.optim.Optimizer],
    replacements: Mapping[nn.Parameter, Sequence[tuple[nn.Parameter, Carry | None]]],
) -> int:
    """Put each replaced parameter's successors at its place in every optimizer that holds it, carrying its state.

    Args:
        optimizers: the optimizers to edit in place.
        replacements: old parameter -> its successors, each with the function that carries the old state
            (``None``: the successor starts with no state). Scalars of the state (a step count) are copied.

    Returns:
        The number of old parameters found (and replaced) in the optimizers.
    """
    by_id = {id(old): (old, new) for old, new in replacements.items()}
    found = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            params: list[Any] = []
            for p in group["params"]:
                if id(p) not in by_id:
                    params.append(p)
                    continue
                found += 1
                old, successors = by_id[id(p)]
                state = optimizer.state.pop(old, None)
                for new, carry in successors:
                    params.append(new)
                    if state and carry is not None and _carriable(state, old):
                        optimizer.state[new] = {k: _carried(v, old, carry) for k, v in state.items()}
            group["params"] = params
    return found


def _carriable(state: Mapping[str, Any], old: Tensor) -> bool:
    """Whether every tensor of the state is a scalar or shaped like the parameter (Adam, SGD, RMSprop, ...);
    factored states (Adafactor's row and column statistics) cannot be sliced here, so their successor starts fresh."""
    return all(not isinstance(v, Tensor) or v.dim() == 0 or v.shape == old.shape for v in state.values())


def _carried(value: Any, old: Tensor, carry: Carry) -> Any:
    if isinstance(value, Tensor) and value.dim() and value.shape == old.shape:
        return carry(value)
    return value.clone() if isinstance(value, Tensor) else value
