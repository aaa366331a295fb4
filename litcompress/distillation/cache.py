"""`TeacherCache`: reuse a frozen teacher's outputs across epochs, keyed on the input itself.

Keys are content hashes of each sample's input bytes (for a dict of inputs, the rows of all its tensors), not
sample indices: an input changed by random augmentation gets a new key, so a stale target is never served. When a
later pass over the data finds few of its inputs in the cache (augmentation at work), :meth:`end_epoch` reports it
and the cache switches itself off.

Outputs are stored in ``dtype``, or with ``top_k`` as each output row's (a sample's logits, or each position's
logits for sequences) ``k`` largest logits, their class indices, and one fill logit for every other class. The fill
is chosen so that at the distillation temperature the ``k`` kept classes get exactly the teacher's probabilities
and the remaining mass is spread evenly over the rest: ``fill = T * (logsumexp(rest / T) - log(C - k))``. For a
50k-token vocabulary, ``k=32`` in float16 keeps 194 bytes per position (values, int32 indices, fill) instead of
200 kB. Fresh outputs go through the same round trip (:meth:`TeacherCache.add` returns them so), so the targets
never depend on whether an input was cached: what is stored changes speed only.

>>> import torch
>>> cache = TeacherCache()
>>> x = torch.arange(6.0).reshape(2, 3)
>>> keys = cache.keys(x)
>>> cache.lookup(keys) is None
True
>>> cache.add(keys, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
tensor([[1., 2.],
        [3., 4.]])
>>> cache.lookup(keys)
tensor([[1., 2.],
        [3., 4.]])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from litcompress._validation import check_choice, check_fraction, check_int, check_real, fail

__all__ = ["TeacherCache", "attach_cache", "check_storage", "topk_compress", "topk_expand"]

_COUNTERS = ("passes", "full", "hits", "lookups", "batches", "refused")  # the pass statistics, saved with the state


def check_storage(max_bytes: Any, dtype: Any, top_k: Any, prefix: str = "") -> torch.dtype:
    """Validate the storage options, named ``prefix + name`` in messages; returns ``dtype`` (a name resolved).

    Args:
        max_bytes: memory for stored outputs, an int >= 1.
        dtype: the storage dtype: a floating-point ``torch.dtype`` or one of ``"float32"``, ``"float16"``,
            ``"bfloat16"``.
        top_k: logits kept per output row, an int >= 1, or ``None`` for all of them.
        prefix: put before each argument's name in error messages (``"cache_"`` for ``DistillationModule``).
    """
    check_int(prefix + "max_bytes", max_bytes, minimum=1)
    check_int(prefix + "top_k", top_k, minimum=1, allow_none=True)
    if isinstance(dtype, str):
        check_choice(prefix + "dtype", dtype, ("float32", "float16", "bfloat16"))
        dtype = getattr(torch, dtype)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        fail(prefix + "dtype", "a floating-point torch.dtype", dtype, exc=TypeError,
              hint="use torch.float16, torch.bfloat16 or torch.float32")
    return dtype


def attach_cache(cache: Any, temperature: float, features: bool = False,
                 regression: bool = False) -> TeacherCache | None:
    """The cache :class:`~litcompress.DistillationModule` uses for its ``cache`` argument: ``False``/``None`` (no
    cache), ``True`` (a :class:`TeacherCache` with its defaults) or a :class:`TeacherCache`; checked against the
    module's other options. The module gets its own empty cache with the settings of the one given (one
    ``TeacherCache`` can configure several modules); a ``temperature`` of ``None`` becomes the distillation one.

    Args:
        cache: the ``cache`` argument.
        temperature: the distillation temperature (the ``top_k`` fill is computed for it).
        features: whether intermediate features are distilled (their teacher outputs are not cached).
        regression: whether the task loss is ``"mse"`` (outputs that are not logits: no ``top_k``).

    >>> attach_cache(TeacherCache(dtype="float16"), temperature=4.0).temperature
    4.0
    >>> attach_cache(False, temperature=4.0) is None
    True
    """
    if cache is None or cache is False:
        return None
    if cache is True:
        cache = TeacherCache()
    if not isinstance(cache, TeacherCache):
        fail("cache", "a bool or a TeacherCache", type(cache).__name__, exc=TypeError,
             hint="e.g. cache=True, or cache=TeacherCache(dtype='float16', top_k=32)")
    if features:
        fail("cache", "False with `features`", cache,
             hint="intermediate teacher features are not cached; drop one of the two")
    if cache.top_k is not None and regression:
        fail("cache", "a TeacherCache with top_k=None with task_loss='mse'", cache,
             hint="regression outputs are not logits; cache them in full")
    if cache.temperature is not None and cache.top_k is not None and cache.temperature != float(temperature):
        fail("cache", f"a TeacherCache whose temperature is the distillation temperature ({temperature}) or None",
             cache, hint="its top_k fill is exact at one temperature: leave TeacherCache(temperature=None)")
    return TeacherCache(cache.max_bytes, cache.dtype, cache.min_hit_rate, cache.top_k,
                        float(temperature) if cache.temperature is None else cache.temperature, cache.in_checkpoint)


class TeacherCache:
    """Teacher outputs per input, within a memory bound.

    The augmentation check: an epoch is a complete pass when it looked up as many batches as the epoch has. Once
    the cache has observed a complete pass since it was last empty, an epoch finding fewer than ``min_hit_rate``
    of its inputs cached means the inputs change between epochs: :meth:`end_epoch` warns and turns the cache off.
    Not when the cache was already full before the epoch (the inputs it left out miss, whatever the data); the
    epoch in which it first fills up returns a one-time message saying so instead.

    Args:
        max_bytes: memory for stored outputs; when full, new inputs are not stored (the teacher runs for them).
        dtype: storage dtype (``torch.float16`` halves the memory; ``torch.float32`` keeps targets bit-exact). The
            targets are always the outputs after this round trip, cached or not.
        min_hit_rate: below this share of cached inputs on a repeated complete pass, augmentation is assumed and
            the cache turns itself off.
        top_k: keep only the ``k`` largest logits of each output row (see the module docstring); ``None`` keeps
            the full outputs. The targets are always the outputs after this round trip, cached or not.
        temperature: the distillation temperature the ``top_k`` fill is computed for; ``None`` (default): the
            temperature of the :class:`~litcompress.DistillationModule` it is given to (1.0 when used alone).
        in_checkpoint: a :class:`~litcompress.DistillationModule` also saves the cached outputs (up to
            ``max_bytes``) in checkpoints, so a resumed fit need not run the teacher again. By default only the
            cache's small state is saved; resume is exact either way (the targets do not depend on what is
            cached), the contents only save time.
    """

    def __init__(self, max_bytes: int = 1 << 30, dtype: torch.dtype | str = torch.float32, min_hit_rate: float = 0.5,
                 top_k: int | None = None, temperature: float | None = None, in_checkpoint: bool = False):
        dtype = check_storage(max_bytes, dtype, top_k)
        check_fraction("min_hit_rate", min_hit_rate, closed_right=True)
        check_real("temperature", temperature, allow_none=True)
        if not isinstance(in_checkpoint, bool):
            fail("in_checkpoint", "a bool", in_checkpoint, exc=TypeError)
        self.max_bytes, self.dtype, self.min_hit_rate = max_bytes, dtype, min_hit_rate
        self.top_k = top_k
        self.temperature = None if temperature is None else float(temperature)
        self.in_checkpoint = in_checkpoint
        self.classes = 0  # output width, for expanding top-k rows
        self.enabled = True
        self.clear()

    def __repr__(self) -> str:
        return (f"TeacherCache(max_bytes={self.max_bytes}, dtype={self.dtype}, min_hit_rate={self.min_hit_rate}, "
                f"top_k={self.top_k}, temperature={self.temperature}, in_checkpoint={self.in_checkpoint})")

    def clear(self) -> None:
        """Empty the cache; the count of complete passes starts again."""
        self.store: dict[bytes, tuple[Tensor, ...]] = {}
        self.bytes = 0
        self.passes = 0  # complete passes observed since the cache was last empty
        self.full = False  # an `add` found no room in an epoch already closed
        self.hits = self.lookups = self.batches = self.refused = 0  # this epoch: rows, rows, batches, rows

    @staticmethod
    def keys(inputs: Tensor | Mapping[str, Any]) -> list[bytes]:
        """One content hash per sample (the first dimension), including shape and dtype.

        For a dict of inputs (keyword arguments), each sample's key covers every tensor's row with its name; other
        values (flags, strings) go into every key whole, by their ``repr``.
        """
        named = {"": inputs} if isinstance(inputs, Tensor) else dict(sorted(inputs.items()))
        tensors = {k: v.detach().cpu().contiguous() for k, v in named.items() if isinstance(v, Tensor)}
        sizes = {len(t) if t.dim() else -1 for t in tensors.values()}
        if len(sizes) != 1 or -1 in sizes:
            fail("inputs", "a tensor, or a dict whose tensors share the batch dimension, for the teacher cache",
                  {k: tuple(t.shape) for k, t in tensors.items()}, hint="set cache=False for these inputs")
        plain = {k: v for k, v in named.items() if k not in tensors}
        if not all(_is_plain(v) for v in plain.values()):
            fail("inputs", "tensors and plain values (numbers, strings, None) for the teacher cache",
                  {k: type(v).__name__ for k, v in plain.items()}, hint="set cache=False for these inputs")
        header = "".join(f"{k + ':' if k else ''}{tuple(t.shape[1:])}{t.dtype}" for k, t in tensors.items())
        header += repr(plain) if plain else ""
        n = sizes.pop()
        rows = [t.reshape(n, -1).view(torch.uint8).numpy() for t in tensors.values()]  # raw bytes, whatever the dtype
        return [hashlib.blake2b(header.encode() + b"".join(r[i].tobytes() for r in rows), digest_size=16).digest()
                for i in range(n)]

    def lookup(self, keys: list[bytes]) -> Tensor | None:
        """The stacked float32 outputs when every key is cached, else ``None`` (hit statistics are updated)."""
        self.lookups += len(keys)
        self.batches += 1
        found = [row for k in keys if (row := self.store.get(k)) is not None]
        self.hits += len(found)
        if len(found) < len(keys):
            return None
        return self._expand([torch.stack(column) for column in zip(*found)])

    def add(self, keys: list[bytes], outputs: Tensor) -> Tensor:
        """Store the outputs of new keys while memory lasts; returns all of them as :meth:`lookup` would.

        The returned float32 outputs (on the device of ``outputs``) went through the storage round trip, stored
        or not, so the targets never depend on what the cache holds.
        """
        parts = self._compress(outputs)
        stored = tuple(p.cpu() for p in parts)
        for key, *row in zip(keys, *stored):
            if key in self.store:
                continue
            size = sum(t.numel() * t.element_size() for t in row)
            if self.bytes + size > self.max_bytes:
                self.refused += 1
                continue
            self.store[key] = tuple(t.clone() for t in row)
            self.bytes += size
        return self._expand(parts)

    def round_trip(self, outputs: Tensor) -> Tensor:
        """The float32 outputs as the cache would return them, without storing anything."""
        return self._expand(self._compress(outputs))

    def _compress(self, outputs: Tensor) -> tuple[Tensor, ...]:
        outputs = outputs.detach()
        if self.top_k is None:
            return (outputs.to(self.dtype),)
        self.classes = outputs.shape[-1]
        temperature = 1.0 if self.temperature is None else self.temperature
        return topk_compress(outputs.float(), self.top_k, temperature, self.dtype)

    def _expand(self, parts: Sequence[Tensor]) -> Tensor:
        if self.top_k is None:
            return parts[0].float()
        values, indices, fill = parts  # as made by `topk_compress`
        return topk_expand(values, indices, fill, classes=self.classes)

    def end_epoch(self, batches_in_epoch: int | None = None) -> str | None:
        """Close an epoch's statistics; returns a message when the cache turns off (augmentation) or is full.

        Args:
            batches_in_epoch: the batches a complete epoch has (``None``: unknown, or the epoch does not cover the
                data); the epoch is a complete pass when it looked up that many.
        """
        rate = self.hits / self.lookups if self.lookups else 1.0
        checked = self.enabled and self.passes >= 1 and not self.full
        newly_full, complete = self.refused > 0 and not self.full, 0 < self.batches == batches_in_epoch
        self.hits = self.lookups = self.batches = self.refused = 0
        self.passes += complete
        if checked and rate < self.min_hit_rate:
            self.enabled = False
            self.clear()
            return (f"Teacher cache: only {rate:.0%} of this epoch's inputs were seen before: the inputs change "
                    "between epochs (random augmentation?). Cached targets would not match them, so the cache is "
                    "off and the teacher runs on every batch.")
        if newly_full:
            self.full = True
            return (f"Teacher cache: full with {len(self.store)} rows ({self.bytes} bytes, `max_bytes` is "
                    f"{self.max_bytes}); the teacher runs for the inputs left out. A larger bound caches more.")
        return None

    def state_dict(self, contents: bool = True) -> dict[str, Any]:
        """``enabled``, ``top_k``, ``classes``, the pass statistics and, with ``contents``, ``keys`` and ``values``.

        The pass statistics (``passes``, ``full``, and this epoch's ``hits``, ``lookups``, ``batches``,
        ``refused``) describe the contents: a state without contents restores an empty cache that counts afresh.
        """
        state: dict[str, Any] = {"enabled": self.enabled, "top_k": self.top_k, "classes": self.classes}
        state.update({name: getattr(self, name) for name in _COUNTERS})
        if contents:
            keys = list(self.store)
            state["keys"] = torch.tensor([list(k) for k in keys], dtype=torch.uint8) if keys else None
            state["values"] = [torch.stack(c) for c in zip(*(self.store[k] for k in keys))] if keys else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        contents = state.get("keys") is not None
        if contents and state.get("top_k") != self.top_k:
            fail("top_k", f"{state.get('top_k')}, as in the checkpoint being resumed", self.top_k,
                  hint="a checkpoint's cache contents keep the layout they were saved with")
        self.clear()
        self.enabled = bool(state.get("enabled", True))
        self.classes = int(state.get("classes", 0))
        if not contents:
            return
        for name in _COUNTERS:
            setattr(self, name, type(getattr(self, name))(state.get(name, 0)))
        columns = state["values"] if isinstance(state["values"], (list, tuple)) else [state["values"]]
        for key, *row in zip(state["keys"], *columns):
            self.store[bytes(key.tolist())] = tuple(row)
            self.bytes += sum(t.numel() * t.element_size() for t in row)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, bytes))


def topk_compress(logits: Tensor, k: int, temperature: float = 1.0,
                  dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest logits of each row (last dimension), their indices, and the fill logit for the rest.

    Args:
        logits: the logits, classes in the last dimension.
        k: logits kept per row, an int >= 1 (all of them when ``k`` >= the number of classes).
        temperature: the distillation temperature at which the kept classes keep their exact probabilities.
        dtype: the dtype of the values and the fill; the indices are ``int16`` (``int32`` beyond 32,767 classes).

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
    """Full float32 logits of ``classes`` columns from :func:`topk_compress`'s parts.

    Args:
        values: the kept logits, ``(..., k)``.
        indices: their class indices, shaped like ``values``.
        fill: the fill logit of every other class, ``(..., 1)``.
        classes: the number of classes (the width of the result).
    """
    out = fill.float().expand(*fill.shape[:-1], classes).clone()
    return out.scatter_(-1, indices.long(), values.float())
