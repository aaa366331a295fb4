"""One parameter slice that a group of channels or heads lives in, and the slices of a group of coupled channels
(private: for the channel and head pruners)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from litcompress.layers import HFConv1D
from litcompress.sparsity._tp import _Member

__all__: list[str] = []


@dataclass
class _Slice:
    """One parameter a group touches: ``param[..., index, ...]`` along ``dim`` belongs to root channel ``root``."""

    module: nn.Module
    attr: str
    dim: int
    index: Tensor  # positions along `dim`
    root: Tensor  # the root channel of each position
    producer: bool  # an output slice (scored); consumers' input slices are only zeroed

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.attr)


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # the norms whose channels are masked with a group


def member_slices(members: list[_Member], names: Mapping[nn.Module, str]) -> tuple[list[_Slice], str | None]:
    """The parameter slices of a group of coupled channels, or (``[]``, why) when it holds a layer this cannot mask
    exactly (a LayerNorm, a grouped convolution, an unknown layer with parameters)."""
    out: list[_Slice] = []
    for member in members:
        module, producer, index, root = member.module, member.producer, member.index, member.root
        if not list(module.parameters(recurse=False)):
            continue  # element-wise ops, reshapes, pooling: nothing to mask
        where = names.get(module, type(module).__name__)
        if isinstance(module, NORMS):
            attrs = [(a, 0) for a in ("weight", "bias") if getattr(module, a, None) is not None]
        elif isinstance(module, nn.Linear):
            attrs = [("weight", 0), ("bias", 0)] if producer else [("weight", 1)]
        elif isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            if module.groups > 1 and not depthwise:
                return [], f"`{where}` is a grouped convolution"
            out_dim = 1 if module.transposed else 0
            attrs = [("weight", out_dim), ("bias", 0)] if producer or depthwise else [("weight", 1 - out_dim)]
        elif isinstance(module, HFConv1D):  # weight (in, out): the transpose of nn.Linear
            attrs = [("weight", 1), ("bias", 0)] if producer else [("weight", 0)]
        elif isinstance(module, nn.Embedding):
            attrs = [("weight", 1)]
        else:
            return [], f"`{where}` ({type(module).__name__}) cannot be masked exactly"
        for attr, dim in attrs:
            tensor = getattr(module, attr, None)
            if tensor is None:
                continue
            if index.numel() and int(index.max()) >= tensor.shape[dim]:
                return [], (f"`{where}` reads the channels reshaped (a view or reshape between the layers): the "
                            f"dependency graph maps them to position {int(index.max())} of its {tensor.shape[dim]}")
            out.append(_Slice(module, attr, dim, index, root, producer))
    return out, None
