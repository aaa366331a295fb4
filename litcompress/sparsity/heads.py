"""Attention heads pruned whole: masked during training, then removed (``nn.MultiheadAttention``).

A head ``h`` of an attention layer with ``H`` heads of size ``d`` owns rows ``h*d .. (h+1)*d`` of each of the query,
key and value projections (and their biases) and the same columns of the output projection. Zeroing them all makes
the head contribute exactly nothing (its values are zero), so the masked layer computes what the layer without the
head computes. ``nn.MultiheadAttention`` ties its inner width to ``embed_dim``, so a layer that lost heads becomes
:class:`PrunedMultiheadAttention`: the same call signature, attribute and ``state_dict`` names, with an inner width
of ``kept heads * d`` (its input and output stay ``embed_dim`` wide).

>>> import torch
>>> from torch import nn
>>> attn = nn.MultiheadAttention(8, 4, batch_first=True).eval()
>>> x = torch.randn(2, 5, 8)
>>> with torch.no_grad():
...     for s in head_slices(attn):
...         _ = s.tensor.index_fill_(s.dim, s.index[s.root == 1], 0.0)  # head 1 masked
...     masked = attn(x, x, x)[0]
>>> smaller = remove_heads(attn, torch.tensor([True, False, True, True]))
>>> smaller.num_heads, smaller.in_proj_weight.shape[0], torch.allclose(smaller(x, x, x)[0], masked, atol=1e-6)
(3, 18, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litcompress.sparsity._slice import _Slice

__all__ = ["PrunedMultiheadAttention", "head_slices", "heads_stay", "remove_heads"]


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose heads were pruned: ``num_heads * head_dim`` may be less than ``embed_dim``.

    Same ``forward`` arguments and outputs as ``nn.MultiheadAttention`` (``attn_mask`` of shape ``(N * H, L, S)``
    is given for the original heads and indexed with :attr:`kept_heads`), same parameter names. Built by
    :func:`remove_heads`, which copies the kept weights in (a new layer's projection weights are uninitialised).

    Args:
        embed_dim: the width of the query input and of the output.
        num_heads: the number of heads (those kept).
        head_dim: the size of one head (the original layer's ``embed_dim // num_heads``).
        kdim: the width of the key input (``None``: ``embed_dim``).
        vdim: the width of the value input (``None``: ``embed_dim``).
        bias: whether the input and output projections have biases.
        batch_first: inputs and outputs are ``(N, L, E)`` rather than ``(L, N, E)``.
        dropout: dropout probability on the attention weights, in training.
        kept_heads: the original index of each head (``None``: ``0 .. num_heads - 1``).
        device: where the parameters are made.
        dtype: the parameters' dtype.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 kept_heads: Tensor | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight: nn.Parameter | None = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **kw))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        kept = torch.arange(num_heads) if kept_heads is None else kept_heads.long()
        self.kept_heads: Tensor
        self.register_buffer("kept_heads", kept)  # original index of each head (for 3-D masks; saved with the model)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.in_proj_weight is not None:
            q, k, v = self.in_proj_weight.chunk(3)
            return q, k, v
        assert self.q_proj_weight is not None and self.k_proj_weight is not None and self.v_proj_weight is not None
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend, as ``nn.MultiheadAttention.forward``.

        Args:
            query: as ``nn.MultiheadAttention``: ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)``.
            key: as ``nn.MultiheadAttention``: ``(S, N, kdim)``, ``(N, S, kdim)`` or ``(S, kdim)``.
            value: as ``nn.MultiheadAttention``: ``(S, N, vdim)``, ``(N, S, vdim)`` or ``(S, vdim)``.
            key_padding_mask: as ``nn.MultiheadAttention``: ``(N, S)``, ``True`` (or ``-inf``) for keys ignored.
            need_weights: as ``nn.MultiheadAttention``: also return the attention weights.
            attn_mask: as ``nn.MultiheadAttention``: ``(L, S)``, or ``(N * H, L, S)`` for the original ``H`` heads
                (indexed with :attr:`kept_heads`); boolean ``True`` masks out, a float mask is added.
            average_attn_weights: as ``nn.MultiheadAttention``: average the returned weights over the heads.
            is_causal: as ``nn.MultiheadAttention``: a hint that ``attn_mask`` is causal; with no mask given, a
                causal mask is applied.

        Returns:
            The output, shaped like ``query`` with ``embed_dim`` features, and the attention weights (``None``
            unless ``need_weights``).
        """
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self._weights()
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        n, tq, h, d = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        q = F.linear(query, w_q, b_q).view(n, tq, h, d).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(n, key.shape[1], h, d).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(n, value.shape[1], h, d).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (N * H_original, L, S)
            mask = mask.view(n, -1, tq, mask.shape[-1]).index_select(1, self.kept_heads.to(mask.device))
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        if is_causal and mask is None:
            mask = _additive(torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).triu(1), q.dtype)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        out = F.dropout(weights, self.dropout, self.training) @ v
        out = self.out_proj(out.transpose(1, 2).reshape(n, tq, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
        if not need_weights:
            return out, None
        shown = weights.mean(1) if average_attn_weights else weights
        return out, shown.squeeze(0) if unbatched else shown


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


Attention = (nn.MultiheadAttention, PrunedMultiheadAttention)


def heads_stay(attn: Any) -> str | None:
    """Why the heads of ``attn`` cannot be pruned, or ``None`` when they can."""
    from litcompress.quantization.layers import QuantizedLayer

    if isinstance(attn, QuantizedLayer):
        return "quantization-aware attention keeps its heads (exclude it from QAT to prune them)"
    if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
        return "attention with add_bias_kv / add_zero_attn keeps its heads"
    if attn.num_heads < 2:
        return "attention with one head keeps it"
    return None


def head_slices(attn: Any) -> list[_Slice]:
    """Every parameter slice the heads of ``attn`` live in, each position tagged with its head (``root``)."""
    h, d = attn.num_heads, attn.head_dim
    inner = h * d
    head_of = torch.arange(inner) // d
    rows = torch.arange(inner)
    out = []
    if attn.in_proj_weight is not None:
        three = torch.cat([rows + i * inner for i in range(3)])
        out.append(_Slice(attn, "in_proj_weight", 0, three, head_of.repeat(3), True))
    else:
        for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            out.append(_Slice(attn, attr, 0, rows, head_of, True))
    if attn.in_proj_bias is not None:
        out.append(_Slice(attn, "in_proj_bias", 0, torch.cat([rows + i * inner for i in range(3)]),
                          head_of.repeat(3), True))
    out.append(_Slice(attn.out_proj, "weight", 1, rows, head_of, True))
    return out


@torch.no_grad()
def remove_heads(attn: Any, keep: Tensor) -> PrunedMultiheadAttention:
    """A :class:`PrunedMultiheadAttention` holding the heads of ``attn`` where ``keep`` is ``True`` (at least one),
    their weights copied. The output projection stays the same module (its weight narrowed, its bias the same
    ``Parameter``); the layer's options are kept."""
    keep = keep.bool().cpu()
    h, d = attn.num_heads, attn.head_dim
    rows = torch.nonzero(keep.repeat_interleave(d)).flatten()
    old_kept = getattr(attn, "kept_heads", torch.arange(h)).cpu()
    ref = attn.out_proj.weight
    new = PrunedMultiheadAttention(
        attn.embed_dim, int(keep.sum()), d, attn.kdim, attn.vdim, bias=attn.in_proj_bias is not None,
        batch_first=attn.batch_first, dropout=attn.dropout, kept_heads=old_kept[keep],
        device=ref.device, dtype=ref.dtype)
    inner = h * d
    if attn.in_proj_weight is not None:
        three = torch.cat([rows + i * inner for i in range(3)]).to(ref.device)
        assert new.in_proj_weight is not None  # packed like the original's
        new.in_proj_weight.copy_(attn.in_proj_weight.index_select(0, three))
    else:
        for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            getattr(new, attr).copy_(getattr(attn, attr).index_select(0, rows.to(ref.device)))
    if attn.in_proj_bias is not None:
        three = torch.cat([rows + i * inner for i in range(3)]).to(ref.device)
        assert new.in_proj_bias is not None  # built with bias=True above
        new.in_proj_bias.copy_(attn.in_proj_bias.index_select(0, three))
    out = attn.out_proj  # the same module, its weight narrowed and its bias the same Parameter
    assert isinstance(out, nn.Linear)
    out.weight = nn.Parameter(ref.index_select(1, rows.to(ref.device)), requires_grad=ref.requires_grad)
    out.in_features = int(rows.numel())
    new.out_proj = out
    new.train(attn.training)
    return new


@dataclass
class _HeadRemover:
    """Removes pruned heads of the attention layer ``name`` of ``model``: the layer is replaced by
    :func:`remove_heads`'s smaller one, and the pair recorded in ``replaced`` (a
    :class:`~litcompress.sparsity._remover._Remover`)."""

    model: nn.Module = field(repr=False)
    name: str
    replaced: dict[nn.Module, nn.Module] = field(repr=False)  # old layer -> its replacement (the pruner's record)

    def remove(self, keep: Tensor) -> None:
        old = self.model.get_submodule(self.name)
        new = remove_heads(old, keep)
        self.model.set_submodule(self.name, new)
        self.replaced[old] = new
