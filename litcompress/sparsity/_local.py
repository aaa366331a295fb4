"""Where the slices of a :class:`~litcompress.sparsity.channels.ChannelPruner` lie on FSDP2 row shards.

A slice is ``tensor[..., index, ...]`` along ``dim``. On a tensor sharded along rows (``DTensor``, ``Shard(0)``), a
slice along dimension 0 keeps the positions this process holds (shifted to local rows), and a slice along another
dimension lies in every process's rows. Per-channel sums are then added up over processes: each process adds what
its rows hold (a whole, unsharded tensor is added by rank zero alone), so the sum is the unsharded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from litcompress._shards import Shards, local

__all__: list[str] = []


class LocalView:
    """This process's part of every slice in ``slices`` (objects with ``module``, ``attr``, ``dim``, ``index``,
    ``root`` and ``tensor``), or ``None`` from :meth:`of` when no slice's tensor is sharded."""

    def __init__(self, shards: Shards, keys: list[tuple[int, str]]) -> None:
        self.shards = shards
        self.rows = dict(zip(keys, shards.rows))
        self.whole = {k for k, sharded in zip(keys, shards.sharded) if not sharded}

    @staticmethod
    def of(slices: Sequence[Any]) -> LocalView | None:
        seen: dict[tuple[int, str], Any] = {}
        for s in slices:
            seen.setdefault((id(s.module), s.attr), s)
        keys = list(seen)
        shards = Shards.of([s.tensor for s in seen.values()], [f"{type(s.module).__name__}.{s.attr}"
                                                                  for s in seen.values()])
        return None if shards is None else LocalView(shards, keys)

    def positions(self, s: Any, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions`` of ``s`` (along ``s.dim``) that this process holds, in its local coordinates, and a mask of
        which of the given positions they are."""
        rows = self.rows.get((id(s.module), s.attr))
        if rows is None or s.dim != 0:
            return positions, torch.ones(positions.shape, dtype=torch.bool)
        held = (positions >= rows[0]) & (positions < rows[1])
        return positions[held] - rows[0], held

    def part(self, s: Any) -> tuple[Tensor, Tensor, Tensor]:
        """This process's rows of ``s.tensor``, the local positions of ``s`` in them and their root channels."""
        index, held = self.positions(s, s.index)
        return local(s.tensor), index, s.root[held]

    def adds(self, s: Any) -> bool:
        """Whether this process adds ``s``'s values to a sum over processes (a whole tensor: rank zero only)."""
        return (id(s.module), s.attr) not in self.whole or self.shards.rank == 0

    def sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the processes (one all-reduce)."""
        return self.shards.all_reduce(x.to(self.shards.device), "SUM").cpu()
