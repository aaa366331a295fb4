"""Attention heads of Hugging Face attention blocks pruned whole, then removed.

Two layouts are recognised by what the modules hold, not by class name (no ``transformers`` import):

- BERT-style: a block with ``self.query``, ``self.key``, ``self.value`` (``nn.Linear``, ``self.attention_head_size``)
  and ``output.dense``, the projection back to the hidden width (BERT, RoBERTa, ELECTRA, ...).
- Llama-style: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear``) and ``head_dim`` (Llama, Mistral,
  Qwen2, ...). With grouped-query attention one key/value head serves ``heads / kv_heads`` query heads: the unit
  pruned is that key/value head together with its query heads, so the ratio the block was built with holds.
- GPT-2-style: one packed ``c_attn`` (``Conv1D``, query, key and value side by side, split by ``split_size``) and
  ``c_proj``, with ``head_dim``. Torch-Pruning cannot trace the split, so :func:`traceable` gives such blocks a
  stand-in forward while the channel graph of the rest of the model is traced.

Head ``h`` owns rows ``h*d .. (h+1)*d`` of the query, key and value projections (weights and biases) and the same
columns of the output projection. Zeroing them all makes the head add exactly nothing, so the masked block computes
what the block without the head computes. Projecting a head's channels one by one instead (as a channel
dependency graph does) is wrong after removal: the block splits what is left into heads of ``d`` again, mixing
channels of different heads.

>>> import torch
>>> from torch import nn
>>> class Attention(nn.Module):  # Llama-style, 4 query heads sharing 2 key/value heads of size 4
...     def __init__(self):
...         super().__init__()
...         self.head_dim = 4
...         self.q_proj, self.o_proj = nn.Linear(8, 16), nn.Linear(16, 8)
...         self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
>>> found = find_attention(Attention())
>>> block = found[""]
>>> block.heads, block.kv_heads, block.units
(4, 2, 2)
>>> block.remove(torch.tensor([False, True]))
>>> block.q.out_features, block.k.out_features, block.o.in_features
(8, 4, 8)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from litcompress.layers import HFConv1D, sync_sizes
from litcompress.sparsity._slice import _Slice

__all__ = ["HEAD_ATTRIBUTES", "AttentionPlan", "HFAttention", "PackedAttention", "find_attention", "traceable",
           "unknown_attention"]

HEAD_ATTRIBUTES = ("num_heads", "n_heads", "n_head", "num_attention_heads", "attention_head_size", "head_dim",
                   "head_size", "key_value_proj_dim")
"""Attributes that mark a module as attention: its projections are split into heads."""


@dataclass
class HFAttention:
    """One attention block's projections (and, by :meth:`remove`, what removes its pruned heads).

    Attributes:
        module: the module holding the query/key/value projections.
        q, k, v: the query, key and value projections (``nn.Linear``, output rows grouped by head).
        o: the output projection (``nn.Linear``, input columns grouped by query head).
        head_dim: the size of one head.
    """

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def units(self) -> int:
        """What is pruned: key/value heads, each with the query heads that read it (all heads without GQA)."""
        return self.kv_heads

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        return self.q, self.k, self.v, self.o

    @property
    def selectors(self) -> tuple[nn.Module, ...]:
        """The projections whose selection asks for the block's heads to be pruned."""
        return self.q, self.k, self.v

    def why_not(self) -> str | None:
        """Why the heads of this block cannot be pruned, or ``None`` when they can."""
        from litcompress.quantization.layers import QuantizedLayer

        d = self.head_dim
        if d < 1 or self.q.out_features % d or self.k.out_features != self.v.out_features or self.k.out_features % d:
            return f"its projections are not whole heads of size {d}"
        if self.heads % max(self.kv_heads, 1) or self.o.in_features != self.q.out_features:
            return "its query heads do not share key/value heads evenly"
        if self.units < 2:
            return "attention with one (key/value) head keeps it"
        if any(isinstance(p, QuantizedLayer) for p in self.projections):
            return "quantization-aware attention keeps its heads (exclude its projections from QAT to prune them)"
        return None

    def slices(self) -> list[_Slice]:
        """Every parameter slice the heads live in, each position tagged with its unit (``root``)."""
        d, per_unit = self.head_dim, self.heads // self.kv_heads
        q_rows, kv_rows = torch.arange(self.heads * d), torch.arange(self.kv_heads * d)
        q_unit, kv_unit = q_rows // d // per_unit, kv_rows // d
        out = []
        for layer, rows, unit in ((self.q, q_rows, q_unit), (self.k, kv_rows, kv_unit), (self.v, kv_rows, kv_unit)):
            out.append(_Slice(layer, "weight", 0, rows, unit, True))
            if layer.bias is not None:
                out.append(_Slice(layer, "bias", 0, rows, unit, True))
        out.append(_Slice(self.o, "weight", 1, q_rows, q_unit, True))
        return out

    @torch.no_grad()
    def remove(self, keep: Tensor) -> None:
        """Delete the units where ``keep`` is ``False`` (at least one stays) from the projections, in place. The
        blocks infer their head count from the projections' widths; the BERT-style counters follow."""
        keep = keep.bool().cpu()
        d, per_unit = self.head_dim, self.heads // self.kv_heads
        q_keep = torch.nonzero(keep.repeat_interleave(per_unit * d)).flatten()
        kv_keep = torch.nonzero(keep.repeat_interleave(d)).flatten()
        _narrow(self.q, 0, q_keep, output=True)
        _narrow(self.k, 0, kv_keep, output=True)
        _narrow(self.v, 0, kv_keep, output=True)
        _narrow(self.o, 1, q_keep, output=False)
        self.refresh()

    def refresh(self) -> None:
        """Set the block's head counters from its projections' widths (after a removal, or a resize on load)."""
        for attr, value in (("num_attention_heads", self.heads), ("all_head_size", self.heads * self.head_dim)):
            if isinstance(getattr(self.module, attr, None), int):
                setattr(self.module, attr, value)


@dataclass
class PackedAttention:
    """A GPT-2-style block: ``c_attn`` holds query, key and value side by side (``Conv1D``, weight ``(in, 3 *
    inner)``), ``c_proj`` maps the heads back (weight ``(inner, out)``)."""

    module: nn.Module
    c_attn: nn.Module
    c_proj: nn.Module
    head_dim: int

    @property
    def inner(self) -> int:
        return _width(self.c_proj, 0)

    @property
    def heads(self) -> int:
        return self.inner // self.head_dim

    kv_heads = heads
    units = heads

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        return self.c_attn, self.c_proj

    @property
    def selectors(self) -> tuple[nn.Module, ...]:
        return (self.c_attn,)

    def why_not(self) -> str | None:
        from litcompress.quantization.layers import QuantizedLayer

        if getattr(self.module, "is_cross_attention", False):
            return "cross-attention keeps its heads"
        if self.head_dim < 1 or self.inner % self.head_dim or _width(self.c_attn, 1) != 3 * self.inner:
            return f"its projections are not whole heads of size {self.head_dim}"
        if self.heads < 2:
            return "attention with one head keeps it"
        if any(isinstance(p, QuantizedLayer) for p in self.projections):
            return "quantization-aware attention keeps its heads (exclude its projections from QAT to prune them)"
        return None

    def slices(self) -> list[_Slice]:
        columns = torch.arange(3 * self.inner)
        unit = columns % self.inner // self.head_dim
        rows = torch.arange(self.inner)
        out = [_Slice(self.c_attn, "weight", 1, columns, unit, True)]
        if self.c_attn.bias is not None:
            out.append(_Slice(self.c_attn, "bias", 0, columns, unit, True))
        out.append(_Slice(self.c_proj, "weight", 0, rows, rows // self.head_dim, True))
        return out

    @torch.no_grad()
    def remove(self, keep: Tensor) -> None:
        """Delete the heads where ``keep`` is ``False`` (at least one stays) from the projections, in place."""
        keep = keep.bool().cpu()
        inner = self.inner
        rows = torch.nonzero(keep.repeat_interleave(self.head_dim)).flatten()
        _narrow(self.c_attn, 1, torch.cat([rows + i * inner for i in range(3)]), output=True)
        _narrow(self.c_proj, 0, rows, output=False)
        self.refresh()

    def refresh(self) -> None:
        for attr, value in (("split_size", self.inner), ("num_heads", self.heads)):
            if isinstance(getattr(self.module, attr, None), int):
                setattr(self.module, attr, value)

    def stand_in(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        """A forward Torch-Pruning can trace: the same projections and shapes, no split."""
        return self.c_proj(self.c_attn(hidden_states)[..., : self.inner]), None


Block = HFAttention | PackedAttention


def _linear(module: nn.Module | None, *names: str) -> list[nn.Linear] | None:
    found = [getattr(module, n, None) for n in names]
    return [m for m in found if isinstance(m, nn.Linear)] if all(isinstance(m, nn.Linear) for m in found) else None


def find_attention(model: nn.Module) -> dict[str, Block]:
    """The BERT-, Llama- and GPT-2-style attention blocks of ``model``, by the name of the module that holds the
    query/key/value projections."""
    out: dict[str, Block] = {}
    for name, module in model.named_modules():
        inner, output = getattr(module, "self", None), getattr(module, "output", None)
        qkv = _linear(inner, "query", "key", "value")
        dense = _linear(output, "dense")
        size = getattr(inner, "attention_head_size", None)
        if inner is not None and qkv and dense and isinstance(size, int):
            q, k, v = qkv
            out[f"{name}.self" if name else "self"] = HFAttention(inner, q, k, v, dense[0], size)
            continue
        proj = _linear(module, "q_proj", "k_proj", "v_proj", "o_proj")
        size = getattr(module, "head_dim", None)
        if proj and isinstance(size, int):
            q, k, v, o = proj
            out[name] = HFAttention(module, q, k, v, o, size)
            continue
        c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
        if isinstance(c_attn, HFConv1D) and isinstance(c_proj, HFConv1D) and isinstance(size, int) and isinstance(
                getattr(module, "split_size", None), int):
            out[name] = PackedAttention(module, c_attn, c_proj, size)
    return out


def unknown_attention(model: nn.Module, blocks: dict[str, Block]) -> dict[str, tuple[str, list[nn.Module]]]:
    """Modules that look like attention (an integer head attribute, projections as direct children) in a layout
    :func:`find_attention` does not know (OPT, T5, ViT, GPT-NeoX, ...): ``name -> (why, projections)``. Their
    channels must not be pruned one by one (the heads would be regrouped wrongly after removal), so they keep them."""
    from litcompress.sparsity.heads import Attention

    known = {id(b.module) for b in blocks.values()}
    out: dict[str, tuple[str, list[nn.Module]]] = {}
    for name, module in model.named_modules():
        if id(module) in known or isinstance(module, Attention):
            continue
        marks = [a for a in HEAD_ATTRIBUTES if type(getattr(module, a, None)) is int]
        layers: list[nn.Module] = [m for m in module.children() if isinstance(m, (nn.Linear, HFConv1D))]
        if marks and layers:
            why = (f"{type(module).__name__} (with `{marks[0]}`) looks like attention in a layout litcompress does "
                   "not know: its projections keep their channels (single channels of head-split projections cannot "
                   "be removed exactly)")
            out[name] = (why, layers)
    return out


@contextlib.contextmanager
def traceable(blocks: Iterable[Block]) -> Iterator[None]:
    """GPT-2-style blocks run :meth:`PackedAttention.stand_in` inside the context (for tracing), their own forward
    again after it."""
    packed = [b for b in blocks if isinstance(b, PackedAttention)]
    own = [vars(b.module).get("forward") for b in packed]  # a forward set on the instance (hooks, wrappers) stays
    for b in packed:
        b.module.forward = b.stand_in
    try:
        yield
    finally:
        for b, forward in zip(packed, own):
            if forward is None:
                del b.module.forward
            else:
                b.module.forward = forward


def _width(layer: nn.Module, dim: int) -> int:
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[dim])


def _narrow(layer: nn.Module, dim: int, keep: Tensor, output: bool) -> None:
    """Keep positions ``keep`` of ``layer``'s weight along ``dim`` (and of its bias when they are its outputs)."""
    weight = layer.weight
    assert isinstance(weight, Tensor)
    keep = keep.to(weight.device)
    layer.weight = nn.Parameter(weight.index_select(dim, keep), requires_grad=weight.requires_grad)
    bias = layer.bias
    if output and isinstance(bias, Tensor):
        layer.bias = nn.Parameter(bias.index_select(0, keep), requires_grad=bias.requires_grad)
    sync_sizes(layer)


@dataclass
class AttentionPlan:
    """What channel pruning does with a model's attention: the blocks whose heads go whole, and the projections
    (of those and of attention in unknown layouts) whose channels channel groups must leave alone, with why."""

    blocks: dict[str, Block]
    unknown: dict[str, tuple[str, list[nn.Module]]]

    @classmethod
    def of(cls, model: nn.Module) -> AttentionPlan:
        blocks = find_attention(model)
        return cls(blocks, unknown_attention(model, blocks))

    @property
    def keep(self) -> dict[nn.Module, str]:
        """Projection -> why a channel group that touches it is skipped."""
        out = {p: f"coupled to the projections of `{n}`, whose heads are pruned whole"
               for n, b in self.blocks.items() for p in b.projections}
        return out | {p: f"coupled to `{n}`: {why}" for n, (why, layers) in self.unknown.items() for p in layers}

    def selected(self, selected: set[nn.Module]) -> tuple[dict[str, Block], dict[str, str]]:
        """The blocks whose heads are pruned (one of their projections selected), and why other selected ones
        keep theirs."""
        heads, why_not = {}, {}
        for name, b in self.blocks.items():
            if any(p in selected for p in b.selectors):
                why = b.why_not()
                if why is None:
                    heads[name] = b
                else:
                    why_not[name] = why
        why_not |= {n: why for n, (why, layers) in self.unknown.items() if any(p in selected for p in layers)}
        return heads, why_not
