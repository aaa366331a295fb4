"""`Pruner`: masks for a set of tensors, computed to a scheduled fraction of their targets and enforced.

Pure torch: usable in any training loop. Call :meth:`Pruner.accumulate` between ``backward`` and
``optimizer.step()`` (data-dependent importance only), :meth:`Pruner.update` when the schedule says so, and
:meth:`Pruner.apply` after every optimizer step. Masks are ``torch.bool`` (one byte per weight) and live
outside the model, so the model's ``state_dict`` keys never change.

>>> import torch
>>> from torch import nn
>>> from litcompress.selection import select_parameters
>>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
>>> pruner = Pruner(select_parameters(model), sparsity=0.75, scope="layer")
>>> pruner.update(fraction=1.0)
{'0.weight': 0.75, '1.weight': 0.75}
>>> int((model[0].weight == 0).sum())
48
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from litcompress._compat import foreach_mul_, foreach_norm
from litcompress._shards import Shards, is_sharded, local, local_part, to_dtensor_like
from litcompress._validation import check_choice, check_fraction, fail
from litcompress.selection import ParameterRef
from litcompress.sparsity.importance import DATA_DEPENDENT, IMPORTANCES, ImportanceFn, accumulate_
from litcompress.sparsity.importance import magnitude as _magnitude
from litcompress.sparsity.importance import random_scores as _random_scores
from litcompress.sparsity.masks import Scores, global_masks, nm_mask, parse_nm, unstructured_mask

__all__ = ["Pruner", "default_scope"]

Reduce = Callable[[Tensor], Tensor]


def _resolved(scores: Scores) -> Tensor:
    return scores() if callable(scores) else scores


def _resolve_targets(refs: Sequence[ParameterRef], sparsity: float | Mapping[str, float]) -> dict[str, float]:
    """Final sparsity per tensor name. A mapping's first matching pattern wins; unmatched tensors stay dense."""
    if isinstance(sparsity, Mapping):
        targets: dict[str, float] = {}
        names = [r.name for r in refs]
        for pattern, value in sparsity.items():
            if not isinstance(pattern, str):
                fail("sparsity", "a mapping from name regexes to floats", sparsity, exc=TypeError)
            check_fraction(f"sparsity[{pattern!r}]", value)
            hits = [n for n in names if re.search(pattern, n) and n not in targets]
            if not any(re.search(pattern, n) for n in names):
                fail("sparsity", "patterns that each match at least one selected parameter", pattern,
                      hint="the selected parameters are: " + ", ".join(names))
            targets.update({n: float(value) for n in hits})
        return targets
    check_fraction("sparsity", sparsity)
    return {r.name: float(sparsity) for r in refs}


Scope = Literal["layer", "global"]


def default_scope(sparsity: float | Mapping[str, float] | None, pattern: str = "unstructured") -> Scope:
    """The scope used when none is given: one global magnitude threshold for one float sparsity (what Lightning's
    ``ModelPruning`` does, and measured: 12.5x pruning of LeNet-300-100 loses 1.8 points with a global threshold,
    28 with per-layer ones, see ``benchmarks/RESULTS.md``); per layer for per-tensor targets and ``N:M`` patterns.

    >>> default_scope(0.9), default_scope({"fc": 0.9}), default_scope(None, "2:4")
    ('global', 'layer', 'layer')
    """
    return "layer" if isinstance(sparsity, Mapping) or pattern != "unstructured" else "global"


class Pruner:
    """Masks for ``refs``, scheduled toward per-tensor targets, enforced in place.

    Args:
        refs: the tensors to prune (from :func:`litcompress.selection.select_parameters`).
        sparsity: final fraction of zeros: one float, or a mapping from name regexes to per-tensor targets
            (the first matching pattern wins; tensors matched by no pattern are not pruned). Ignored for an
            ``N:M`` pattern, whose target is ``1 - N/M``.
        scope: ``"layer"`` prunes each tensor to its target; ``"global"`` uses one threshold over all. ``None``
            (default): ``"global"`` for one float sparsity, ``"layer"`` for a mapping or an ``N:M`` pattern (see
            :func:`default_scope`).
        pattern: ``"unstructured"`` or ``"N:M"`` (at most N nonzeros in every M consecutive inputs).
        importance: ``"magnitude"``, ``"movement"``, ``"taylor"``, ``"random"``, or ``fn(name, weight)``.
        seed: seed of the ``"random"`` importance.
    """

    def __init__(
        self,
        refs: Sequence[ParameterRef],
        sparsity: float | Mapping[str, float],
        scope: Scope | None = None,
        pattern: str = "unstructured",
        importance: str | ImportanceFn = "magnitude",
        seed: int = 0,
    ) -> None:
        scope = default_scope(sparsity, pattern) if scope is None else scope
        check_choice("scope", scope, ("layer", "global"))
        if not callable(importance):
            check_choice("importance", importance, IMPORTANCES, hint="or pass a callable fn(name, weight)")
        self.nm = None if pattern == "unstructured" else parse_nm(pattern)
        if self.nm is not None:
            n, m = self.nm
            targets = {r.name: 1 - n / m for r in refs}
            for r in refs:
                t = r.tensor
                if t.shape[r.input_dim] % m:
                    fail("pattern", "an N:M whose M divides the input size of every pruned tensor", pattern,
                          hint=f"`{r.name}` has {t.shape[r.input_dim]} inputs (shape {tuple(t.shape)}); "
                          "exclude it or choose another M")
        else:
            targets = _resolve_targets(refs, sparsity)
        self.refs = [r for r in refs if r.name in targets]
        # FSDP2 shards (DTensor rows): masks, scores and snapshots hold this process's rows only
        self.shards = Shards.of([r.tensor for r in self.refs], [r.name for r in self.refs])
        if self.nm is not None and self.shards is not None:
            self._check_nm_shards()
        self.targets = targets
        self.scope = scope
        self.importance = importance
        self.seed = seed
        self.masks: dict[str, Tensor] = {}
        self._groups: list[tuple[list[Tensor], list[Tensor]]] | None = None  # apply()'s cached operands
        self.scores: dict[str, Tensor] = {}
        self.snapshot: dict[str, Tensor] = {}
        self._updates = 0

    def _check_nm_shards(self) -> None:
        assert self.nm is not None and self.shards is not None
        m = self.nm[1]
        for r, rows in zip(self.refs, self.shards.rows):
            if rows is not None and r.input_dim == 0 and (rows[0] % m or rows[1] % m):
                fail("pattern", "N:M groups that no shard boundary splits", f"{self.nm[0]}:{m}",
                      hint=f"`{r.name}` groups its inputs along dimension 0, which FSDP shards: this process holds "
                      f"rows {rows[0]}..{rows[1]}, not a multiple of {m}; shard it along dim 1 (fully_shard's "
                      "`shard_placement_fn`) or exclude it")

    def _local(self, r: ParameterRef) -> Tensor:
        return local(r.tensor)

    @property
    def names(self) -> list[str]:
        """Names of the pruned tensors, in selection order."""
        return [r.name for r in self.refs]

    @property
    def data_dependent(self) -> bool:
        """Whether importance needs gradients (:meth:`accumulate` after every backward)."""
        return self.importance in DATA_DEPENDENT

    # ------------------------------------------------------------------ importance
    def accumulate(self, only: set[int] | None = None, skip_nonfinite: bool = False) -> bool:
        """Add this step's ``weight * grad`` evidence (movement / Taylor) to the scores.

        Call it after ``backward`` and before ``optimizer.step()``. Tensors without a gradient are skipped.

        Args:
            only: ids of the tensors to consider (those of the optimizer about to step); ``None`` for all.
            skip_nonfinite: skip the whole step if a gradient holds inf/NaN (a step a GradScaler will discard).

        Returns:
            Whether evidence was added.
        """
        if not self.data_dependent:
            return False
        assert isinstance(self.importance, str)  # the data-dependent importances are named ones
        with_grad = [(r, local(g)) for r in self.refs
                     if (g := r.tensor.grad) is not None and (only is None or id(r.tensor) in only)]
        if not with_grad:
            return False
        refs, grads = [r for r, _ in with_grad], [g for _, g in with_grad]
        if skip_nonfinite and not torch.isfinite(torch.stack(foreach_norm(grads))).all():
            return False
        for r in refs:
            if r.name not in self.scores:
                t = self._local(r)
                self.scores[r.name] = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        accumulate_(self.importance, [self.scores[r.name] for r in refs], [self._local(r) for r in refs], grads)
        return True

    def _importance(self, reduce: Reduce | None) -> Mapping[str, Scores]:
        rows = self.shards.rows if self.shards is not None else [None] * len(self.refs)
        if self.importance == "magnitude":  # computed when needed: |w| of all tensors never exists at once
            return {r.name: functools.partial(_magnitude, self._local(r)) for r in self.refs}
        if self.importance == "random":  # drawn for the whole tensor (the same on every process), then sliced
            return {r.name: local_part(_random_scores(r.tensor, self.seed * 1_000_003 + self._updates * 1009 + i),
                                       r.tensor, rows[i]).to(self._local(r).device)
                    for i, r in enumerate(self.refs)}
        if callable(self.importance):
            out = {}
            for r, part in zip(self.refs, rows):
                s = self.importance(r.name, r.tensor.detach())
                if not isinstance(s, Tensor) or s.shape != r.tensor.shape:
                    got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                    fail("importance", f"a callable returning a tensor of shape {tuple(r.tensor.shape)} "
                          f"for `{r.name}`", got)
                out[r.name] = local_part(s, r.tensor, part)
            return out
        scores = {r.name: self.scores.get(r.name, torch.zeros(self._local(r).shape, device=self._local(r).device))
                  for r in self.refs}
        # one collective for all tensors; sharded gradients are already averaged and each process scores its rows
        if reduce is not None and self.shards is None:
            flat = reduce(torch.cat([s.reshape(-1) for s in scores.values()]))
            parts = flat.split([s.numel() for s in scores.values()])
            scores = {r.name: p.reshape(self._local(r).shape) for r, p in zip(self.refs, parts)}
        return scores

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def update(self, fraction: float, reduce: Reduce | None = None) -> dict[str, float]:
        """Recompute masks at ``fraction`` (the schedule's value) of the final targets and apply them.

        Args:
            fraction: in ``[0, 1]``; at 1 every tensor is at its target to one element.
            reduce: averages a tensor over processes (``trainer.strategy.reduce``) for gradient-based scores.

        Returns:
            The sparsity of every pruned tensor after the update.
        """
        check_fraction("fraction", fraction, closed_right=True)
        scores = self._importance(reduce)
        if self.importance == "taylor":  # Taylor evidence counts since the last update only
            self.scores.clear()
        previous = [self.masks.get(r.name) for r in self.refs]
        shards = self.shards
        one = [None if shards is None else shards.subset([i]) for i in range(len(self.refs))]
        if self.nm is not None:
            n, m = self.nm
            new = [nm_mask(_resolved(scores[r.name]), n, m, fraction, prev, r.input_dim, shards=sub)
                   for r, prev, sub in zip(self.refs, previous, one)]
        elif self.scope == "global":
            target = fraction * next(iter(self.targets.values()))
            new = global_masks([scores[r.name] for r in self.refs], target, previous, shards=shards)
        else:
            new = [unstructured_mask(_resolved(scores[r.name]), fraction * self.targets[r.name], prev, shards=sub)
                   for r, prev, sub in zip(self.refs, previous, one)]
        self.masks = {r.name: mask.to(self._local(r).device) for r, mask in zip(self.refs, new)}
        self._groups = None
        self._updates += 1
        self.apply()
        return self.sparsity()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight in place: one fused multiply per device and dtype.

        The bool masks are multiplied through a zero-copy ``uint8`` view: the same result, ~3x faster on CPU than
        a bool operand (which makes every multiply convert its mask).
        """
        if self._groups is None:
            groups: dict[tuple[Any, Any], tuple[list[Tensor], list[Tensor]]] = {}
            for r in self.refs:
                if r.name in self.masks:
                    t = self._local(r)  # FSDP2: the rows this process holds (a view of the sharded storage)
                    tensors, masks = groups.setdefault((t.device, t.dtype), ([], []))
                    tensors.append(t)
                    masks.append(self.masks[r.name].view(torch.uint8))
            self._groups = list(groups.values())
        for tensors, masks in self._groups:
            foreach_mul_(tensors, masks)

    def _kept(self) -> list[int]:
        """Kept entries of every pruned tensor (summed over the processes holding its shards)."""
        kept = torch.tensor([int(torch.count_nonzero(self.masks[r.name])) if r.name in self.masks
                             else self._local(r).numel() for r in self.refs], dtype=torch.int64)
        return (self.shards.total(kept) if self.shards is not None else kept).tolist()

    def sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries of every tensor (0 before the first update)."""
        return {r.name: 1.0 - kept / r.tensor.numel() for r, kept in zip(self.refs, self._kept())}

    def global_sparsity(self) -> float:
        """Fraction of pruned entries over all pruned tensors together (each tensor counted once)."""
        return 1.0 - sum(self._kept()) / sum(r.tensor.numel() for r in self.refs)

    # ------------------------------------------------------------------ rewinding
    @torch.no_grad()
    def take_snapshot(self) -> None:
        """Remember the current weights (for lottery-ticket rewinding)."""
        self.snapshot = {r.name: self._local(r).detach().clone() for r in self.refs}

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset the surviving weights to the snapshot; pruned ones stay zero."""
        for r in self.refs:
            if r.name in self.snapshot:
                self._local(r).copy_(self.snapshot[r.name])
        self.apply()

    # ------------------------------------------------------------------ state
    def follow_layout(self) -> None:
        """Re-read how the tensors are laid out, after a strategy sharded them (FSDP2 replaces parameters with
        ``DTensor`` shards when the fit starts): masks, scores and snapshots kept so far are cut to this
        process's rows. Collective when the tensors are sharded: call it on every process."""
        if self.shards is not None or not any(is_sharded(r.tensor) for r in self.refs):
            return
        self.shards = Shards.of([r.tensor for r in self.refs], [r.name for r in self.refs])
        assert self.shards is not None
        if self.nm is not None:
            self._check_nm_shards()
        for store in (self.masks, self.scores, self.snapshot):
            for r, rows in zip(self.refs, self.shards.rows):
                if r.name in store:
                    store[r.name] = local_part(store[r.name], r.tensor, rows)
        self._groups = None

    def to_tensor_devices(self) -> None:
        """Move masks, scores and snapshots next to their tensors (after a checkpoint load or a device move)."""
        for store in (self.masks, self.scores, self.snapshot):
            for r in self.refs:
                if r.name in store:
                    store[r.name] = store[r.name].to(self._local(r).device)
        self._groups = None

    def state_dict(self) -> dict[str, Any]:
        """Masks, accumulated scores, snapshot and update count: everything needed to resume exactly.

        Those of sharded tensors are ``DTensor``s laid out like their tensors (this process's rows), for a
        distributed checkpoint that saves each process's shard.
        """
        def out(store: dict[str, Tensor]) -> dict[str, Tensor]:
            return {r.name: to_dtensor_like(store[r.name], r.tensor) if is_sharded(r.tensor) else store[r.name]
                    for r in self.refs if r.name in store}

        return {"masks": out(self.masks), "scores": out(self.scores), "snapshot": out(self.snapshot),
                "updates": self._updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; every stored tensor must belong to a pruned tensor of the same shape."""
        shapes = {r.name: r.tensor.shape for r in self.refs}
        for key in ("masks", "scores", "snapshot"):
            for name, value in state.get(key, {}).items():
                if name not in shapes or value.shape != shapes[name]:
                    fail("state_dict", f"{key} for the pruned tensors {sorted(shapes)}", name,
                          hint="the checkpoint was written for a different model or a different selection")
        refs = {r.name: (r, None if self.shards is None else self.shards.rows[i]) for i, r in enumerate(self.refs)}
        # whole tensors (an unsharded checkpoint) or DTensors: each process keeps its rows
        self.masks, self.scores, self.snapshot = (
            {name: local_part(value, refs[name][0].tensor, refs[name][1]) for name, value in state.get(key, {}).items()}
            for key in ("masks", "scores", "snapshot"))
        self._updates = int(state.get("updates", 0))
        self.to_tensor_devices()
