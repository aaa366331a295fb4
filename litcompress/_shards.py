"""Row shards of FSDP2 parameters: what this process holds, and the few collectives that make a computation over
shards equal the computation over whole tensors.

``torch.distributed.fsdp.fully_shard`` turns each parameter into a ``DTensor`` sharded along dimension 0 over a
1-D device mesh: every process holds a contiguous block of rows (``DTensor.to_local()``), in rank order. A mask,
a score or an optimizer-side copy of such a tensor is kept the same way, next to the local rows, and never
gathered. What needs all the rows (a global threshold, a tensor's pruned count) is reduced exactly: integer counts
are summed, minima and maxima are reduced, and tie-breaking by position uses the rows' order across ranks.

Tensors that are not sharded (plain tensors, or replicated ``DTensor``s) are held whole by every process; their
counts are never summed over processes, so mixing them with sharded ones is exact too.

Pure torch; without ``torch.distributed`` initialised nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor

from litcompress._validation import fail

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__: list[str] = []


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds (``t`` itself unless it is a ``DTensor``)."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``DTensor`` split over processes (not merely replicated)."""
    return is_dtensor(t) and any(p.is_shard() for p in t.placements)


def check_row_sharded(name: str, t: Tensor) -> None:
    """Only FSDP2's default layout is supported: rows (dim 0) split over a 1-D mesh."""
    if not is_sharded(t):
        return
    placements = t.placements
    if len(placements) != 1 or not placements[0].is_shard(0):
        fail("parameters", "tensors sharded along dimension 0 over a 1-D device mesh (FSDP2's default layout)",
             f"`{name}` with placements {placements}",
             hint="tensor parallelism, HSDP (2-D meshes) and `shard_placement_fn` layouts are not supported yet; "
                  "exclude this tensor or shard it with plain `fully_shard`")


def to_dtensor_like(value: Tensor, like: DTensor) -> Tensor:
    """``value`` (this process's rows) as a ``DTensor`` laid out like ``like``; for a checkpoint that saves shards."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=_contiguous_stride(like.shape))


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, out = 1, []
    for size in reversed(shape):
        out.append(stride)
        stride *= size
    return tuple(reversed(out))


def local_part(value: Tensor, like: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """``value`` (a ``DTensor``, or a whole tensor shaped like ``like``) reduced to this process's rows.

    ``rows``: the ``(start, stop)`` rows of ``like`` held here; ``None`` when ``like`` is not sharded.
    """
    if is_dtensor(value):
        return value.to_local()
    if rows is None:
        return value
    return value[rows[0]:rows[1]]


class Shards:
    """Collectives over the processes that hold the shards of ``tensors`` (one mesh), and each tensor's rows.

    Args:
        tensors: the tensors worked on together (some may be plain or replicated).
        names: their names, for error messages.
    """

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str]) -> None:
        import torch.distributed as dist

        sharded = [t for t in tensors if is_sharded(t)]
        for name, t in zip(names, tensors):
            check_row_sharded(name, t)
        meshes = {tuple(t.device_mesh.mesh.flatten().tolist()) for t in sharded}
        if len(meshes) > 1:
            fail("parameters", "tensors sharded over one device mesh", f"{len(meshes)} meshes",
                 hint="select the tensors of each mesh with a separate callback")
        mesh = sharded[0].device_mesh
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.device = local(sharded[0]).device
        self.sharded = [is_sharded(t) for t in tensors]
        self._flags = torch.tensor(self.sharded, dtype=torch.bool, device=self.device)
        sizes = torch.tensor([local(t).shape[0] if s else 0 for t, s in zip(tensors, self.sharded)],
                             dtype=torch.int64, device=self.device)
        every = self._gather(sizes)  # (world, tensors): rows held by each process
        starts = every.cumsum(0) - every
        self.rows: list[tuple[int, int] | None] = [
            (int(starts[self.rank, i]), int(starts[self.rank, i] + every[self.rank, i])) if s else None
            for i, s in enumerate(self.sharded)]

    @staticmethod
    def of(tensors: Sequence[Tensor], names: Sequence[str]) -> Shards | None:
        """A :class:`Shards` when any of ``tensors`` is sharded, else ``None`` (nothing to communicate)."""
        return Shards(tensors, names) if any(is_sharded(t) for t in tensors) else None

    def _gather(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return torch.stack(out)

    def all_reduce(self, x: Tensor, op: str) -> Tensor:
        """A copy of ``x`` reduced over the processes with ``op`` (``"SUM"``, ``"MIN"``, ``"MAX"``)."""
        import torch.distributed as dist

        x = x.to(self.device).clone()
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op), group=self.group)
        return x

    def total(self, counts: Tensor) -> Tensor:
        """Per tensor: the sum over processes for sharded tensors, the count itself for whole ones."""
        counts = counts.to(self.device)
        summed = self.all_reduce(torch.where(self._flags, counts, torch.zeros_like(counts)), "SUM")
        return torch.where(self._flags, summed, counts)

    def before(self, counts: Tensor) -> Tensor:
        """Per tensor: the sum of ``counts`` on lower ranks (sharded tensors; 0 for whole ones), for position order."""
        every = self._gather(counts.to(self.device))
        lower = every[: self.rank].sum(0)
        return torch.where(self._flags, lower, torch.zeros_like(lower))

    def min(self, value: float) -> float:
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64), "MIN"))

    def max(self, value: float) -> float:
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64), "MAX"))

    def subset(self, index: Sequence[int]) -> Shards:
        """The same processes, for the tensors at ``index`` only (no communication)."""
        out = object.__new__(Shards)
        out.group, out.rank, out.world, out.device = self.group, self.rank, self.world, self.device
        out.sharded = [self.sharded[i] for i in index]
        out._flags = self._flags[list(index)]
        out.rows = [self.rows[i] for i in index]
        return out
