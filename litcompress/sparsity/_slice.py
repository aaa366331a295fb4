"""One parameter slice that a group of channels or heads lives in (private: for the channel and head pruners)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

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
