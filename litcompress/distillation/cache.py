"""`TeacherCache`: reuse a frozen teacher's outputs across epochs, keyed on the input itself.

Keys are content hashes of each sample's input bytes, not sample indices: an input changed by random
augmentation gets a new key, so a stale target is never served. When a later pass over the data finds few of
its inputs in the cache (augmentation at work), :meth:`end_epoch` reports it and the cache switches itself off.

>>> import torch
>>> cache = TeacherCache()
>>> x = torch.arange(6.0).reshape(2, 3)
>>> keys = cache.keys(x)
>>> cache.lookup(keys) is None
True
>>> cache.add(keys, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
>>> cache.lookup(keys)
tensor([[1., 2.],
        [3., 4.]])
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from litcompress._validation import _check_fraction, _check_int

__all__ = ["TeacherCache"]


class TeacherCache:
    """Teacher outputs per input, within a memory bound.

    Args:
        max_bytes: memory for stored outputs; when full, new inputs are not stored (the teacher runs for them).
        dtype: storage dtype (``torch.float16`` halves the memory; ``torch.float32`` keeps targets bit-exact).
        min_hit_rate: below this share of cached inputs on a repeated pass, augmentation is assumed and the
            cache turns itself off.
    """

    def __init__(self, max_bytes: int = 1 << 30, dtype: torch.dtype = torch.float32, min_hit_rate: float = 0.5):
        _check_int("cache_max_bytes", max_bytes, minimum=1)
        _check_fraction("min_hit_rate", min_hit_rate, closed_right=True)
        self.max_bytes, self.dtype, self.min_hit_rate = max_bytes, dtype, min_hit_rate
        self.store: dict[bytes, Tensor] = {}
        self.bytes = 0
        self.enabled = True
        self.hits = self.lookups = 0  # this epoch

    @staticmethod
    def keys(inputs: Tensor) -> list[bytes]:
        """One content hash per sample (the first dimension), including shape and dtype."""
        flat = inputs.detach().cpu().contiguous()
        header = f"{tuple(flat.shape[1:])}{flat.dtype}".encode()
        rows = flat.reshape(len(flat), -1).view(torch.uint8)  # the raw bytes, whatever the dtype
        return [hashlib.blake2b(header + row.numpy().tobytes(), digest_size=16).digest() for row in rows]

    def lookup(self, keys: list[bytes]) -> Tensor | None:
        """The stacked outputs when every key is cached, else ``None`` (hit statistics are updated)."""
        self.lookups += len(keys)
        found = [self.store.get(k) for k in keys]
        hit = sum(v is not None for v in found)
        self.hits += hit
        return torch.stack(found) if hit == len(keys) else None  # type: ignore[arg-type]

    def add(self, keys: list[bytes], outputs: Tensor) -> None:
        for key, value in zip(keys, outputs.detach().to("cpu", self.dtype)):
            if key in self.store:
                continue
            size = value.numel() * value.element_size()
            if self.bytes + size > self.max_bytes:
                return
            self.store[key] = value.clone()
            self.bytes += size

    def end_epoch(self, repeated_pass: bool) -> str | None:
        """Close an epoch's statistics; returns a warning (and turns the cache off) when augmentation shows."""
        rate = self.hits / self.lookups if self.lookups else 1.0
        self.hits = self.lookups = 0
        if repeated_pass and self.enabled and rate < self.min_hit_rate:
            self.enabled = False
            self.store.clear()
            self.bytes = 0
            return (f"Teacher cache: only {rate:.0%} of this epoch's inputs were seen before: the inputs change "
                    "between epochs (random augmentation?). Cached targets would not match them, so the cache is "
                    "off and the teacher runs on every batch.")
        return None

    def state_dict(self) -> dict[str, Any]:
        keys = list(self.store)
        return {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8) if keys else None,
                "values": torch.stack([self.store[k] for k in keys]) if keys else None, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store, self.bytes = {}, 0
        self.enabled = bool(state.get("enabled", True))
        if state.get("keys") is not None:
            for key, value in zip(state["keys"], state["values"]):
                self.store[bytes(key.tolist())] = value
                self.bytes += value.numel() * value.element_size()
