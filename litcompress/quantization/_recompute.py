"""Fake-quantized weights recomputed in backward instead of kept from forward (for FSDP2-sharded layers).

A layer's forward builds ``q(w)``, a new tensor the size of the whole weight, and the matrix product after it
saves that tensor for backward. Under FSDP2 ``w`` is the whole weight only while its unit runs: FSDP frees it after
forward and gathers it again for backward. The saved ``q(w)`` would stay, so every quantized layer would hold a
whole copy of its weight from forward to backward, on every process: the memory FSDP exists to save.

While :func:`recomputed_weights` is active around a layer's forward, every saved tensor that is (a view of) a
fake-quantized weight is packed as a recipe, the weight and its quantizer, and unpacked in backward by quantizing the
weight again (FSDP has gathered it again by then). The values are the same, so the gradients are too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__: list[str] = []


class _Recipe:
    __slots__ = ("offset", "quantizer", "shape", "stride", "weight")

    def __init__(self, weight: Tensor, quantizer: Any, t: Tensor) -> None:
        self.weight, self.quantizer = weight, quantizer
        self.shape, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def __call__(self) -> Tensor:
        with torch.no_grad():
            q = self.quantizer(self.weight)
        return q.as_strided(self.shape, self.stride, self.offset)


@contextlib.contextmanager
def recomputed_weights(made: dict[int, tuple[Tensor, Any]]) -> Iterator[None]:
    """Within it, tensors saved for backward whose storage is a fake-quantized weight listed in ``made`` (storage
    address -> ``(weight, quantizer)``, filled by the layer as it quantizes) are recomputed in backward."""

    def pack(t: Tensor) -> Any:
        if made and t.layout == torch.strided and not t.is_meta:
            entry = made.get(t.untyped_storage().data_ptr())
            if entry is not None:
                return _Recipe(entry[0], entry[1], t)
        return t

    def unpack(packed: Any) -> Tensor:
        return packed() if isinstance(packed, _Recipe) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def wrap_forward(cls: type[nn.Module]) -> None:
    """Make ``cls.forward`` (a quantized layer's) run inside :func:`recomputed_weights` when the layer's
    ``recompute_weights`` is set, fake quantization is on and gradients are recorded; the layer lists the weights it
    quantizes in ``_made`` meanwhile."""
    forward = cls.__dict__.get("forward")
    if forward is None:
        return

    @functools.wraps(forward)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not (self.recompute_weights and self.fake_quant_enabled and torch.is_grad_enabled()):
            return forward(self, *args, **kwargs)
        self._made = {}
        try:
            with recomputed_weights(self._made):
                return forward(self, *args, **kwargs)
        finally:
            self._made = None

    cls.forward = wrapped
