"""Layer kinds and sizes every package shares: Hugging Face's ``Conv1D`` found without importing transformers, and a
layer's size attributes set from its (resized) tensors.

This module sits at the bottom of the package (it imports nothing of litcompress but the error helpers), so
selection, sparsity, quantization, factorization and structure all use the same definitions.

>>> from torch import nn
>>> layer = nn.Linear(8, 4)
>>> layer.weight = nn.Parameter(layer.weight[:2])
>>> sync_sizes(layer)
True
>>> layer.out_features
2
"""

from __future__ import annotations

from abc import ABCMeta
from typing import Any

from torch import Tensor, nn

__all__ = ["HFConv1D", "sync_sizes"]


class HFConv1D(nn.Module, metaclass=ABCMeta):
    """The layer kind of Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ImageGPT, ...).

    A virtual base class, never instantiated: ``isinstance(module, HFConv1D)`` is true for a class named ``Conv1D``
    from a module under ``transformers`` (or a subclass of one), so transformers is never imported to find it. The
    layer computes ``x @ weight + bias`` with ``weight`` stored ``(in_features, out_features)``: its input
    dimension is 0 and its output channels lie along dimension 1 (the transpose of ``nn.Linear``). Layers that
    stand in for it (the quantization-aware ``QATConv1D``) are registered with :meth:`register`.

    >>> Conv1D = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
    >>> isinstance(Conv1D(), HFConv1D), isinstance(nn.Linear(2, 2), HFConv1D)
    (True, False)
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    nf: int

    @staticmethod
    def matches(cls: type) -> bool:
        """Whether ``cls`` itself (not a subclass of it) is transformers' ``Conv1D``."""
        return cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"

    @classmethod
    def __subclasshook__(cls, other: type) -> Any:
        if cls is HFConv1D and any(HFConv1D.matches(base) for base in other.__mro__):
            return True
        return NotImplemented  # the registry (``HFConv1D.register``) decides


def sync_sizes(module: nn.Module) -> bool:
    """Set ``module``'s size attributes (``out_features``, ``out_channels``, ``num_features``, ``nf``, ...) from its
    resized tensors. Returns ``False`` (changing nothing) for a layer kind whose sizes it does not know: the caller
    says what that means for it.

    >>> layer = nn.Linear(8, 4)
    >>> layer.weight = nn.Parameter(layer.weight[:2])
    >>> sync_sizes(layer)
    True
    >>> layer.out_features, layer.in_features
    (2, 8)
    """
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(w, Tensor):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd) and isinstance(w, Tensor):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        out, per_group = (int(w.shape[1]), int(w.shape[0])) if module.transposed else (int(w.shape[0]),
                                                                                        int(w.shape[1]))
        if depthwise:
            module.groups = out
        if module.transposed:
            module.in_channels, module.out_channels = per_group, out * module.groups
        else:
            module.out_channels, module.in_channels = out, per_group * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        size = next(t for t in (w, getattr(module, "running_mean", None)) if isinstance(t, Tensor))
        module.num_features = int(size.shape[0])
    elif isinstance(module, nn.LayerNorm) and isinstance(w, Tensor):
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, nn.Embedding) and isinstance(w, Tensor):
        module.num_embeddings, module.embedding_dim = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, HFConv1D) and isinstance(w, Tensor):
        setattr(module, "nf", int(w.shape[1]))  # noqa: B010  # a duck-typed class: no declared attribute
        if hasattr(module, "nx"):
            setattr(module, "nx", int(w.shape[0]))  # noqa: B010
    else:
        return False
    return True
