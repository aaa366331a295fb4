"""`TeacherCache`: reuse a frozen teacher's outputs across epochs, keyed on the input itself.

Keys are content hashes of each sample's input bytes, not sample indices: an input changed by random
augmentation gets a new key, so a stale target is never served. When a later pass over the data finds few of
its inputs in the cache (augmentation at work), :meth:`end_epoch` reports it and the cache switches itself off.

With ``top_k``, each output row (a sample's logits, or each position's logits for sequences) is kept as its ``k``
largest logits, their class indices, and one fill logit for every other class. The fill is chosen so that at the
distillation temperature the ``k`` kept classes get exactly the teacher's probabilities and the remaining mass is
spread evenly over the rest: ``fill = T * (logsumexp(rest / T) - log(C - k))``. For a 50k-token vocabulary, ``k=32``
in float16 keeps 194 bytes per position (values, int32 indices, fill) instead of 200 kB.

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
import math
from typing import Any

import torch
from torch import Tensor

from litcompress._validation import check_fraction, check_int, fail

__all__ = ["TeacherCache", "topk_compress", "topk_expand"]


class TeacherCache:
    """Teacher outputs per input, within a memory bound.

    Args:
        max_bytes: memory for stored outputs; when full, new inputs are not stored (the teacher runs for them).
        dtype: storage dtype (``torch.float16`` halves the memory; ``torch.float32`` keeps targets bit-exact).
        min_hit_rate: below this share of cached inputs on a repeated pass, augmentation is assumed and the
            cache turns itself off.
        top_k: keep only the ``k`` largest logits of each output row (see the module docstring); ``None`` keeps
            the full outputs.
        temperature: the distillation temperature the ``top_k`` fill is computed for.
    """

    def __init__(self, max_bytes: int = 1 << 30, dtype: torch.dtype = torch.float32, min_hit_rate: float = 0.5,
                 top_k: int | None = None, temperature: float = 1.0):
        check_int("cache_max_bytes", max_bytes, minimum=1)
        check_fraction("min_hit_rate", min_hit_rate, closed_right=True)
        check_int("cache_top_k", top_k, minimum=1, allow_none=True)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            fail("cache_dtype", "a floating-point torch.dtype", dtype, exc=TypeError,
                  hint="use torch.float16, torch.bfloat16 or torch.float32")
        self.max_bytes, self.dtype, self.min_hit_rate = max_bytes, dtype, min_hit_rate
        self.top_k, self.temperature = top_k, float(temperature)
        self.classes = 0  # output width, for expanding top-k rows
        self.store: dict[bytes, tuple[Tensor, ...]] = {}
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
        if hit < len(keys):
            return None
        parts = [torch.stack(column) for column in zip(*found)]  # type: ignore[misc]
        return parts[0] if self.top_k is None else topk_expand(*parts, classes=self.classes)

    def add(self, keys: list[bytes], outputs: Tensor) -> None:
        outputs = outputs.detach()
        if self.top_k is None:
            parts: tuple[Tensor, ...] = (outputs.to("cpu", self.dtype),)
        else:
            self.classes = outputs.shape[-1]
            parts = tuple(p.cpu() for p in topk_compress(outputs.float(), self.top_k, self.temperature, self.dtype))
        for key, *row in zip(keys, *parts):
            if key in self.store:
                continue
            size = sum(t.numel() * t.element_size() for t in row)
            if self.bytes + size > self.max_bytes:
                return
            self.store[key] = tuple(t.clone() for t in row)
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
        columns = [torch.stack(c) for c in zip(*(self.store[k] for k in keys))] if keys else None
        return {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8) if keys else None,
                "values": columns, "enabled": self.enabled, "top_k": self.top_k,
                "classes": self.classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("top_k") != self.top_k:
            fail("cache_top_k", f"{state.get('top_k')}, as in the checkpoint being resumed", self.top_k,
                  hint="a checkpoint's cache keeps the layout it was saved with")
        self.store, self.bytes = {}, 0
        self.enabled = bool(state.get("enabled", True))
        self.classes = int(state.get("classes", 0))
        if state.get("keys") is not None:
            columns = state["values"] if isinstance(state["values"], (list, tuple)) else [state["values"]]
            for key, *row in zip(state["keys"], *columns):
                self.store[bytes(key.tolist())] = tuple(row)
                self.bytes += sum(t.numel() * t.element_size() for t in row)


def topk_compress(logits: Tensor, k: int, temperature: float = 1.0,
                  dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest logits of each row (last dimension), their indices, and the fill logit for the rest.

    >>> values, indices, fill = topk_compress(torch.tensor([[3.0, 1.0, 0.0, 0.0]]), k=1, temperature=1.0)
    >>> torch.tensor([[3.0, 1.0, 0.0, 0.0]]).softmax(-1)
    tensor([[0.8098, 0.1096, 0.0403, 0.0403]])
    >>> topk_expand(values, indices, fill, classes=4).softmax(-1)  # the top class keeps its probability
    tensor([[0.8098, 0.0634, 0.0634, 0.0634]])
    """
    check_int("k", k, minimum=1)
    classes = logits.shape[-1]
    k = min(k, classes)
    values, indices = logits.topk(k, dim=-1)
    if k < classes:
        rest = (logits / temperature).scatter(-1, indices, float("-inf"))
        fill = temperature * (rest.logsumexp(-1, keepdim=True) - math.log(classes - k))
    else:
        fill = values[..., -1:]  # nothing left to fill
    index_dtype = torch.int16 if classes <= torch.iinfo(torch.int16).max else torch.int32
    return values.to(dtype), indices.to(index_dtype), fill.to(dtype)


def topk_expand(values: Tensor, indices: Tensor, fill: Tensor, classes: int) -> Tensor:
    """Full float32 logits of ``classes`` columns from :func:`topk_compress`'s parts."""
    out = fill.float().expand(*fill.shape[:-1], classes).clone()
    return out.scatter_(-1, indices.long(), values.float())
