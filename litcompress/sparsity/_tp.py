"""Adapters between litcompress and Torch-Pruning (private: for ``channels.py``). Every read of Torch-Pruning's
objects lives here: tracing the dependency graph, what a traced output is, how transformers' ``Conv1D`` shrinks,
which layers are the model's outputs, each coupled group as litcompress sees it (:class:`_Member` per layer) and
how a group is removed (:class:`_TPRemover`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._calls import first_tensor
from litcompress._validation import fail
from litcompress.layers import HFConv1D, sync_sizes

__all__ = ["conv1d_pruner", "coupled_groups", "first_output", "output_layers", "trace"]

_Kinds = tuple[type[nn.Module], ...]


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


def trace(model: nn.Module, example_input: Any) -> Any:
    """Torch-Pruning's dependency graph of ``model``, traced on ``example_input`` (``Conv1D`` layers shrink as
    :func:`conv1d_pruner` says). Raises what the tracing raises."""
    import torch_pruning as tp

    conv1d = {type(m): conv1d_pruner(tp) for m in model.modules() if isinstance(m, HFConv1D)}
    with warnings.catch_warnings():
        # norms Torch-Pruning does not know (RMSNorm): their groups are skipped by the caller, with the reason
        warnings.filterwarnings("ignore", "Unwrapped parameters detected", UserWarning)
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                     output_transform=first_output,
                                                     customized_pruners=conv1d or None)


def output_layers(graph: Any, layers: _Kinds, norms: _Kinds) -> list[nn.Module]:
    """The modules of kinds ``layers`` whose outputs leave the model: no layer with parameters (other than one of
    ``norms``) reads them, directly or through parameter-free operations."""
    return [module for module, node in graph.module2node.items()
            if isinstance(module, layers) and not _reaches_layer(node, set(), norms)]


def _reaches_layer(node: Any, seen: set[int], norms: _Kinds) -> bool:
    for nxt in node.outputs:
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        if list(nxt.module.parameters(recurse=False)) and not isinstance(nxt.module, norms):
            return True
        if _reaches_layer(nxt, seen, norms):
            return True
    return False


@dataclass
class _Member:
    """One layer a group of coupled channels lives in."""

    module: nn.Module
    producer: bool  # the channels are this layer's outputs (else its inputs, or a norm's / depthwise conv's own)
    index: Tensor  # the positions (along the layer's channel dimension) the group's channels occupy
    root: Tensor  # the group's channel at each position


@dataclass
class _TPRemover:
    """Removes a group's pruned channels with Torch-Pruning: the group is rebuilt from its root layer and handler on
    the (current) graph, then pruned, so every coupled layer shrinks together (a :class:`~._remover._Remover`)."""

    graph: Any = field(repr=False)
    module: nn.Module
    handler: Any

    def remove(self, keep: Tensor) -> None:
        pruned = torch.nonzero(~keep.bool()).flatten().tolist()
        self.graph.get_pruning_group(self.module, self.handler, idxs=pruned).prune()


@dataclass
class _Coupled:
    """One Torch-Pruning group as litcompress sees it."""

    members: list[_Member]  # every layer it touches, the root layer first
    channels: int
    remover: _TPRemover


def coupled_groups(graph: Any, roots: _Kinds, ignored: list[nn.Module]) -> list[_Coupled]:
    """Every group of coupled channels of ``graph``, rooted at the output channels of a layer of kinds ``roots``,
    that prunes the output channels of none of ``ignored`` (Torch-Pruning's ``get_all_groups``)."""
    out = []
    for group in graph.get_all_groups(root_module_types=list(roots), ignored_layers=ignored):
        items = group._group
        members = [_Member(item.dep.target.module, item.dep.handler.__name__ == "prune_out_channels",
                           torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long),
                           torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)) for item in items]
        first = items[0].dep
        out.append(_Coupled(members, len(items[0].idxs), _TPRemover(graph, first.target.module, first.handler)))
    return out
