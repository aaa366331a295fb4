"""Masks from importance scores: exact counts, deterministic ties, monotone over time.

A mask is a ``torch.bool`` tensor shaped like its weight; ``True`` keeps a weight, ``False`` prunes it (one
byte per weight). Every function here:

- prunes exactly ``round(sparsity * numel)`` elements (never fewer than an earlier mask already pruned), so a
  target is met to one element;
- breaks ties by position (the lower flat index is pruned first), so every process computes the same mask;
- keeps what an earlier ``mask`` pruned pruned: masks only grow sparser.

>>> import torch
>>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.8, 0.7]])
>>> unstructured_mask(scores, 0.5).int()
tensor([[0, 1, 1, 0],
        [0, 0, 1, 1]], dtype=torch.int32)
>>> nm_mask(scores, n=2, m=4).int()
tensor([[0, 1, 1, 0],
        [0, 0, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from litcompress._shards import Shards
from litcompress._validation import check_fraction, fail

__all__ = ["check_nm", "global_masks", "nm_mask", "parse_nm", "unstructured_mask"]


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse ``"N:M"`` into ``(N, M)`` with ``0 < N < M``.

    >>> parse_nm("2:4")
    (2, 4)
    >>> parse_nm("4:4")
    Traceback (most recent call last):
    ...
    ValueError: Expected argument `pattern` to be 'unstructured' or 'N:M' with 0 < N < M (such as '2:4'), but got '4:4'.
    """
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    n, m = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not match or not 0 < n < m:
        fail("pattern", "'unstructured' or 'N:M' with 0 < N < M (such as '2:4')", pattern)
    return n, m


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Boolean tensor marking the ``k`` lowest entries of 1-D ``scores``; ties go to the lower index."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return pruned
    if k >= scores.numel():
        return ~pruned
    threshold = scores.kthvalue(k).values
    pruned = scores < threshold
    need = k - int(torch.count_nonzero(pruned))
    ties = (scores == threshold).nonzero().squeeze(1)[:need]
    pruned[ties] = True
    return pruned


def _prepared(scores: Tensor, mask: Tensor | None, name: str) -> Tensor:
    scores = scores.detach().float().reshape(-1)
    if not torch.isfinite(scores).all():
        fail(name, "finite importance scores", "NaN or inf scores", hint="check the importance function")
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1).to(scores.device), float("-inf"))
    return scores


def _count(sparsity: float, numel: int, mask: Tensor | None) -> int:
    already = 0 if mask is None else mask.numel() - int(torch.count_nonzero(mask))
    return max(round(sparsity * numel), already)


def unstructured_mask(
    scores: Tensor, sparsity: float, mask: Tensor | None = None, shards: Shards | None = None
) -> Tensor:
    """Keep-mask that prunes the lowest-scored ``sparsity`` fraction of one tensor.

    Args:
        scores: importance, any shape; higher is kept.
        sparsity: fraction to prune, in ``[0, 1]``.
        mask: an earlier keep-mask; its pruned entries stay pruned.
        shards: when ``scores`` are this process's rows of a sharded tensor: the processes holding the others
            (the mask is then this process's rows of the mask of the whole tensor).
    """
    check_fraction("sparsity", sparsity, closed_right=True)
    if shards is not None:
        return global_masks([scores], sparsity, [mask], shards)[0]
    flat = _prepared(scores, mask, "scores")
    return ~_prune_lowest(flat, _count(sparsity, flat.numel(), mask)).reshape(scores.shape)


Scores = Tensor | Callable[[], Tensor]
"""Importance scores of one tensor, or a function computing them when they are needed (``lambda: w.abs()``)."""


class _Lazy:
    """Scores materialised one tensor at a time (a callable's result is dropped after each use), checked once."""

    def __init__(self, scores: Sequence[Scores], check: bool = True) -> None:
        self.scores = list(scores)
        self.shapes: list[torch.Size | None] = [None if callable(x) else x.shape for x in self.scores]
        self._checked: set[int] = set() if check else set(range(len(self.scores)))

    def __len__(self) -> int:
        return len(self.scores)

    def flat(self, i: int) -> Tensor:
        x = self.scores[i]
        value = x() if callable(x) else x
        self.shapes[i] = value.shape
        if i in self._checked:
            return value.detach().float().reshape(-1)
        self._checked.add(i)
        return _checked(value, "scores")


def global_masks(
    scores: Sequence[Scores],
    sparsity: float,
    masks: Sequence[Tensor | None] | None = None,
    shards: Shards | None = None,
) -> list[Tensor]:
    """Keep-masks with one threshold across all tensors: the lowest ``sparsity`` fraction of all scores goes.

    Ties go to the lower position in tensor order, then index. The threshold is found one tensor at a time (a
    bisection over the order of float32 values, at most 32 counting passes), so no concatenated or sorted copy of
    all scores is ever made: the extra memory is one temporary the size of the largest tensor. A score given as a
    callable (``lambda: w.abs()``) is computed when needed and dropped, so the scores of all tensors never exist
    at once (the cost: a few more passes over the weights). With ``shards``
    (``scores`` are this process's rows of sharded tensors) each pass sums the counts over processes, and the
    masks are this process's rows of the masks computed over whole tensors.

    Args:
        scores: importance of each tensor (any shape; higher is kept), or a callable computing it when needed.
        sparsity: fraction of all the tensors' entries together to prune, in ``[0, 1]``.
        masks: an earlier keep-mask per tensor (``None`` for a tensor without one); their pruned entries stay pruned.
        shards: when ``scores`` are this process's rows of sharded tensors: the processes holding the others.

    >>> a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 5.0])
    >>> [m.tolist() for m in global_masks([a, b], 0.5)]
    [[False, False, True, True], [False, True]]
    """
    check_fraction("sparsity", sparsity, closed_right=True)
    masks = list(masks) if masks is not None else [None] * len(scores)
    flats = _Lazy(scores)
    keeps = [None if m is None else m.reshape(-1) for m in masks]
    sizes = torch.tensor([flats.flat(i).numel() for i in range(len(flats))])  # also checks each once
    pruned_before = torch.tensor([0 if m is None else m.numel() - int(torch.count_nonzero(m)) for m in keeps])
    if shards is not None:
        sizes, pruned_before = shards.total(sizes), shards.total(pruned_before)
    total, already = int(sizes.sum()), int(pruned_before.sum())
    k = max(round(sparsity * total), already)
    shapes = [shape for shape in flats.shapes if shape is not None]
    if k <= 0 or k >= total:
        return [torch.full(shape, k <= 0, dtype=torch.bool) for shape in shapes]
    return [p.logical_not_().reshape(shape) for shape, p in zip(shapes, _lowest(flats, keeps, k, already, shards))]


def _lowest(
    flats: _Lazy | Sequence[Tensor], keeps: Sequence[Tensor | None], k: int, already: int, shards: Shards | None
) -> list[Tensor]:
    """Mark the ``k`` lowest entries of the 1-D ``flats`` together (``already`` of them are pruned by ``keeps``)."""
    lazy = flats if isinstance(flats, _Lazy) else _Lazy(flats, check=False)  # N:M: +-inf mark fixed entries

    def each() -> Iterator[tuple[Tensor, Tensor | None]]:  # one tensor's scores at a time, next to its keep-mask
        for i, keep in enumerate(keeps):
            f = lazy.flat(i)
            yield f, (None if keep is None else keep.to(f.device))

    def count(value: float, strict: bool) -> int:  # entries below (or at) `value`; pruned ones count as -inf
        per = []
        for f, keep in each():
            below = f < value if strict else f <= value
            n = 0
            if keep is not None:
                below &= keep
                n += keep.numel() - int(torch.count_nonzero(keep))
            per.append(n + int(torch.count_nonzero(below)))
        counts = torch.tensor(per)
        return int((shards.total(counts) if shards is not None else counts).sum())

    lows, highs = [], []
    for f, keep in each():
        if f.numel() and (keep is None or bool(keep.any())):
            lows.append(float(f.min() if keep is None else f[keep].min()))
        if f.numel():
            highs.append(float(f.max()))
    low, high = min(lows, default=float("inf")), max(highs, default=float("-inf"))
    if shards is not None:
        low, high = shards.min(low), shards.max(high)
    lo, hi = _order_key(low), _order_key(high)
    threshold = float("-inf")
    if k > already:  # the k-th smallest score among the entries not yet pruned
        while lo < hi:
            mid = (lo + hi) // 2
            if count(_from_order_key(mid), strict=False) >= k:
                hi = mid
            else:
                lo = mid + 1
        threshold = _from_order_key(lo)
    need = k - count(threshold, strict=True) if k > already else 0
    out, ties = [], []
    for f, keep in each():
        pruned = f < threshold
        if keep is not None:
            pruned |= ~keep
        out.append(pruned)
        if need > 0:
            ties.append(((f == threshold) & keep) if keep is not None else (f == threshold))
    if need > 0:  # ties are pruned in position order: tensor by tensor, rows in rank order, then index
        local_ties = torch.tensor([int(torch.count_nonzero(t)) for t in ties])
        if shards is not None:
            every = shards.total(local_ties).cpu()
            first = every.cumsum(0) - every + shards.before(local_ties).cpu()
        else:
            first = local_ties.cumsum(0) - local_ties
        for pruned, tie, start, held in zip(out, ties, first.tolist(), local_ties.tolist()):
            take = min(max(need - start, 0), held)
            if take:
                pruned[tie.nonzero().squeeze(1)[:take]] = True
    return out


def _checked(scores: Tensor, name: str) -> Tensor:
    flat = scores.detach().float().reshape(-1)
    if not torch.isfinite(flat).all():
        fail(name, "finite importance scores", "NaN or inf scores", hint="check the importance function")
    return flat


def _order_key(value: float) -> int:
    """An integer whose order is the order of float32 values (the IEEE-754 bits, sign-folded)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return bits ^ 0xFFFFFFFF if bits & 0x80000000 else bits | 0x80000000


def _from_order_key(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else key ^ 0xFFFFFFFF
    (value,) = struct.unpack("<f", struct.pack("<I", bits))
    return float(value)


def _groups(t: Tensor, m: int, dim: int) -> Tensor:
    """View ``t`` as rows of ``m`` consecutive entries along ``dim`` (moved last)."""
    return t.movedim(dim, -1).reshape(-1, m)


def _ungroup(g: Tensor, shape: torch.Size, dim: int) -> Tensor:
    moved = list(shape)
    moved.append(moved.pop(dim))
    return g.reshape(moved).movedim(-1, dim)


def nm_mask(
    scores: Tensor,
    n: int,
    m: int,
    fraction: float = 1.0,
    mask: Tensor | None = None,
    dim: int = 1,
    shards: Shards | None = None,
) -> Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive weights along ``dim`` at most ``n`` are kept.

    ``fraction`` (the schedule's value) grows the pattern gradually: the lowest-scored entries are pruned
    until ``fraction * (1 - n/m)`` of the tensor is gone, but never more than ``m - n`` per group, and each
    group's ``n`` best entries are never pruned. At ``fraction=1`` every group holds exactly ``n``.

    Args:
        scores: importance, at least 2-D with ``scores.shape[dim]`` a multiple of ``m``; higher is kept.
        n: how many entries of each group are kept once the pattern is complete.
        m: the group size.
        fraction: how far the pattern has grown, in ``[0, 1]`` (``1``: exactly ``n`` kept per group).
        mask: an earlier keep-mask; its pruned entries stay pruned.
        dim: the dimension the groups run along (``1``: a Linear weight's input dimension).
        shards: when ``scores`` are this process's rows of a sharded tensor (each row holding whole groups): the
            processes holding the others.

    >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.4, 0.3, 0.8, 0.7]])
    >>> nm_mask(scores, 2, 4).int()
    tensor([[0, 1, 1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    if scores.dim() < 2 or scores.shape[dim] % m:
        fail("pattern", f"an N:M group size M dividing the input size (dim {dim})", f"{n}:{m}",
              hint=f"the tensor has shape {tuple(scores.shape)}; exclude it or pick another M")
    check_fraction("fraction", fraction, closed_right=True)
    flat = _prepared(scores, mask, "scores").reshape(scores.shape)
    grouped = _groups(flat, m, dim)
    best = grouped.argsort(dim=1, descending=True, stable=True)[:, :n]  # ties: the lower index is kept
    # the n best of each group are protected; already-pruned entries (-inf) are never among them
    grouped = grouped.scatter(1, best, float("inf"))
    sparsity = fraction * (m - n) / m
    if shards is None:
        pruned = _prune_lowest(grouped.reshape(-1), _count(sparsity, scores.numel(), mask))
    else:  # this process's rows hold whole groups (checked by the caller); the count is over all rows
        numel = int(shards.total(torch.tensor([scores.numel()])).sum())
        already = 0 if mask is None else mask.numel() - int(torch.count_nonzero(mask))
        already = int(shards.total(torch.tensor([already])).sum())
        pruned = _lowest([grouped.reshape(-1)], [None], max(round(sparsity * numel), already), already, shards)[0]
    return ~_ungroup(pruned.reshape(-1, m), scores.shape, dim)


def check_nm(tensor: Tensor, n: int, m: int, dim: int = 1) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim`` has at most ``n`` nonzeros.

    Args:
        tensor: the tensor checked (a weight or a mask); one with fewer than 2 dimensions, or whose size along
            ``dim`` is not a multiple of ``m``, fails the check.
        n: the most nonzeros a group may hold.
        m: the group size.
        dim: the dimension the groups run along.

    >>> check_nm(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4), check_nm(torch.ones(1, 4), 2, 4)
    (True, False)
    """
    if tensor.dim() < 2 or tensor.shape[dim] % m:
        return False
    return bool(((_groups(tensor, m, dim) != 0).sum(1) <= n).all())
