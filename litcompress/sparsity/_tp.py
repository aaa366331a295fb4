"""Adapters between litcompress and Torch-Pruning (private: for ``channels.py``): what a traced output is, and how
transformers' ``Conv1D`` shrinks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from litcompress._calls import first_tensor
from litcompress._validation import fail
from litcompress.layers import sync_sizes

__all__ = ["conv1d_pruner", "first_output"]


def first_output(output: Any) -> Tensor:
    """The tensor a model's output is traced from (:func:`litcompress._calls.first_tensor`)."""
    tensor = first_tensor(output)
    if tensor is None:
        fail("example_input", "an input on which the model returns a tensor (or a tuple / mapping holding one)",
             type(output).__name__, exc=TypeError)
    return tensor


def conv1d_pruner(tp: Any) -> Any:
    """Torch-Pruning's handler for Hugging Face's ``Conv1D`` (GPT-2's projections): ``nn.Linear`` transposed."""
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
