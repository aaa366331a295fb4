"""Attention heads of Hugging Face attention blocks pruned whole, then removed.

Two layouts are recognised by what the modules hold, not by class name (no ``transformers`` import):

- BERT-style: a block with ``self.query``, ``self.key``, ``self.value`` (``nn.Linear``, ``self.attention_head_size``)
  and ``output.dense``, the projection back to the hidden width (BERT, RoBERTa, ELECTRA, ...).
- Llama-style: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear``) and ``head_dim`` (Llama, Mistral,
  Qwen2, ...). With grouped-query attention one key/value head serves ``heads / kv_heads`` query heads: the unit
  pruned is that key/value head together with its query heads, so the ratio the block was built with holds.

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
>>> remove_heads_(block, torch.tensor([False, True]))
>>> block.q.out_features, block.k.out_features, block.o.in_features
(8, 4, 8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from litcompress.sparsity._slice import _Slice

__all__ = ["HFAttention", "find_attention", "remove_heads_"]


@dataclass
class HFAttention:
    """One attention block's projections.

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
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        return self.q, self.k, self.v, self.o

    def why_not(self) -> str | None:
        """Why the heads of this block cannot be pruned, or ``None`` when they can."""
        from litcompress.quantization.modules import QuantizedLayer

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


def _linear(module: nn.Module | None, *names: str) -> list[nn.Linear] | None:
    found = [getattr(module, n, None) for n in names]
    return [m for m in found if isinstance(m, nn.Linear)] if all(isinstance(m, nn.Linear) for m in found) else None


def find_attention(model: nn.Module) -> dict[str, HFAttention]:
    """The BERT-style and Llama-style attention blocks of ``model``, by the name of the module that holds the
    query/key/value projections."""
    out: dict[str, HFAttention] = {}
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
    return out


def _narrow(layer: nn.Linear, dim: int, keep: Tensor) -> None:
    weight = layer.weight
    keep = keep.to(weight.device)
    layer.weight = nn.Parameter(weight.index_select(dim, keep), requires_grad=weight.requires_grad)
    if dim == 0:
        if layer.bias is not None:
            bias = layer.bias
            layer.bias = nn.Parameter(bias.index_select(0, keep), requires_grad=bias.requires_grad)
        layer.out_features = int(keep.numel())
    else:
        layer.in_features = int(keep.numel())


@torch.no_grad()
def remove_heads_(block: HFAttention, keep: Tensor) -> None:
    """Delete the units where ``keep`` is ``False`` (at least one stays) from the block's projections, in place.

    The blocks infer their head count from the projections' widths; the BERT-style counters
    (``num_attention_heads``, ``all_head_size``) are updated too.
    """
    keep = keep.bool().cpu()
    d, per_unit = block.head_dim, block.heads // block.kv_heads
    q_keep = torch.nonzero(keep.repeat_interleave(per_unit * d)).flatten()
    kv_keep = torch.nonzero(keep.repeat_interleave(d)).flatten()
    _narrow(block.q, 0, q_keep)
    _narrow(block.k, 0, kv_keep)
    _narrow(block.v, 0, kv_keep)
    _narrow(block.o, 1, q_keep)
    for attr, value in (("num_attention_heads", block.heads), ("all_head_size", block.heads * d)):
        if isinstance(getattr(block.module, attr, None), int):
            setattr(block.module, attr, value)
