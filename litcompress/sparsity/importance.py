"""Importance scores: which weights matter. Higher scores are kept.

- ``magnitude``: ``|w|`` (Han et al. 2015; Zhu & Gupta 2017).
- ``movement``: ``-sum_t w_t * g_t`` accumulated over optimizer steps (Sanh et al. 2020): weights moving away
  from zero score high, weights shrinking toward zero score low.
- ``taylor``: ``sum_t |w_t * g_t|`` since the last mask update, the first-order Taylor estimate of the loss
  change from removing a weight (Molchanov et al. 2019).
- ``random``: uniform noise from a seeded generator (a baseline; identical on every process).

The accumulating scores are updated in place for a whole list of tensors with fused multi-tensor kernels
(see :mod:`litcompress._compat`).

>>> import torch
>>> w, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
>>> s = [torch.zeros(2)]
>>> accumulate_("movement", s, [w], [g]); s[0]
tensor([-0.5000,  1.0000])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from litcompress._compat import foreach_abs_, foreach_add_, foreach_mul, foreach_sub_
from litcompress._validation import fail

__all__ = ["DATA_DEPENDENT", "IMPORTANCES", "ImportanceFn", "accumulate_", "magnitude", "random_scores"]

IMPORTANCES = ("magnitude", "movement", "taylor", "random")
DATA_DEPENDENT = ("movement", "taylor")
ImportanceFn = Callable[[str, Tensor], Tensor]
"""A user importance: ``fn(name, weight) -> scores`` shaped like ``weight``; higher is kept."""


def magnitude(weight: Tensor) -> Tensor:
    """``|weight|``.

    >>> magnitude(torch.tensor([-3.0, 1.0]))
    tensor([3., 1.])
    """
    return weight.detach().abs()


def random_scores(weight: Tensor, seed: int) -> Tensor:
    """Uniform scores from a generator seeded with ``seed``; the same on every process and every run.

    >>> torch.equal(random_scores(torch.empty(3), 7), random_scores(torch.empty(3), 7))
    True
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape, generator=generator).to(weight.device)


@torch.no_grad()
def accumulate_(kind: str, scores: Sequence[Tensor], weights: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Add one optimizer step's evidence to ``scores`` in place (``kind`` is ``"movement"`` or ``"taylor"``).

    Args:
        kind: ``"movement"`` (``scores -= w * g``) or ``"taylor"`` (``scores += |w * g|``).
        scores: the running scores, one tensor per weight, updated in place.
        weights: the weights, as they are at this step.
        grads: the weights' gradients of this step, in the same order.

    >>> s = [torch.zeros(2)]
    >>> accumulate_("taylor", s, [torch.tensor([1.0, -2.0])], [torch.tensor([0.5, 0.5])]); s[0]
    tensor([0.5000, 1.0000])
    """
    if not scores:
        return
    products = foreach_mul([w.detach().float() for w in weights], [g.float() for g in grads])
    if kind == "movement":
        foreach_sub_(list(scores), products)
    elif kind == "taylor":
        foreach_abs_(products)
        foreach_add_(list(scores), products)
    else:
        fail("kind", f"one of {DATA_DEPENDENT}", kind)
