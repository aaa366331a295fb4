"""What removes a group of channels or heads from the model (private: for the channel pruner and its groups).

Three kinds of part lose channels, each in its own way, behind one method: Torch-Pruning's coupled channels
(``_tp.py``: the dependency graph shrinks every layer of the group), ``nn.MultiheadAttention`` heads (``heads.py``: the
layer is replaced by a smaller one) and Hugging Face attention heads (``hf_heads.py``: the projections are narrowed in
place).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__: list[str] = []


class _Remover(Protocol):
    """Deletes one group's pruned channels (or heads) from the model, in place."""

    def remove(self, keep: Tensor) -> None:
        """Delete the channels where ``keep`` (one bool per channel of the group) is ``False``; at least one stays."""
        ...
