"""`MaskPruner`: what every pruner offers the code that drives it (the callbacks, or your own loop).

:class:`~litcompress.sparsity.Pruner` (unstructured and N:M masks over tensors) and
:class:`~litcompress.sparsity.channels.ChannelPruner` (masks over coupled groups of output channels and attention
heads) both implement it, so one training loop drives either: ``update`` moves the masks to a fraction of the
final target, ``apply`` zeroes what they prune (after every optimizer step), ``accumulate`` gathers gradient-based
scores, and ``state_dict`` / ``load_state_dict`` carry the masks through a checkpoint.

>>> import torch
>>> from torch import nn
>>> from litcompress.selection import select_parameters
>>> from litcompress.sparsity import MaskPruner, Pruner
>>> pruner = Pruner(select_parameters(nn.Linear(8, 4)), 0.5)
>>> isinstance(pruner, MaskPruner)
True
>>> pruner.update(1.0)
{'weight': 0.5}
>>> pruner.global_sparsity()
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from litcompress.selection import ParameterRef

__all__ = ["MaskPruner"]


@runtime_checkable
class MaskPruner(Protocol):
    """A pruner: masks over selected tensors, moved on a schedule and enforced on the weights.

    Attributes:
        refs: the selected tensors (two pruners must not share one).
        data_dependent: whether scores come from gradients (then call :meth:`accumulate` before each update).
    """

    @property
    def refs(self) -> Sequence[ParameterRef]: ...

    @property
    def data_dependent(self) -> bool: ...

    def accumulate(self, only: set[int] | None = None, skip_nonfinite: bool = False) -> bool:
        """Add this step's gradient-based scores (of the tensors whose ``id`` is in ``only``, if given); returns
        whether they were added (``False`` when ``skip_nonfinite`` and a gradient is not finite)."""
        ...

    def update(self, fraction: float, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Move the masks to ``fraction`` (in [0, 1]) of the final target and return the sparsity of every part
        (tensor or channel group); ``reduce`` averages scores over processes."""
        ...

    def apply(self) -> None:
        """Zero the pruned entries of the weights."""
        ...

    def sparsity(self) -> dict[str, float]:
        """Fraction pruned of every part (tensor, or channel group)."""
        ...

    def global_sparsity(self) -> float:
        """Fraction pruned over all parts together."""
        ...

    def follow_layout(self) -> None:
        """Follow the parameters' current layout (FSDP2 row shards made after the pruner was built)."""
        ...

    def to_tensor_devices(self) -> None:
        """Move masks and scores to the devices of their tensors."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Masks and scores, for a checkpoint."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...
