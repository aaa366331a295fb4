"""Adapters between litcompress and Torch-Pruning (private: for ``channels.py``): what a traced output is, and how
transformers' ``Conv1D`` shrinks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from litcompress._validation import fail

__all__ = ["conv1d_pruner", "first_output"]


def first_output(output: Any) -> Tensor:
    """The tensor a model's output is traced from: itself, a ``logits`` field (Hugging Face), or the first tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    fail("example_input", "an input on which the model returns a tensor (or a tuple / mapping holding one)",
         type(output).__name__, exc=TypeError)


def conv1d_pruner(tp: Any) -> Any:
    """Torch-Pruning's handler for Hugging Face's ``Conv1D`` (GPT-2's projections): ``nn.Linear`` transposed."""
    from litcompress.structure.resize import sync_sizes  # structure imports the sparsity package

    class _Conv1DPruner(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
            keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            if layer.bias is not None:
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            sync_sizes(layer)
            return layer

        def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            sync_sizes(layer)
            return layer

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[1])

        def get_in_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[0])

    return _Conv1DPruner()
