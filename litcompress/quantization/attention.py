"""``nn.MultiheadAttention`` converted in place for quantization-aware training (by
:func:`~litcompress.quantization.layers.convert_`): the inputs and weights of its query, key, value and output
projections are fake-quantized.

>>> import torch
>>> from torch import nn
>>> from litcompress.quantization import QuantConfig, convert_
>>> model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
>>> type(convert_(model, QuantConfig(), ["attn"])["attn"]).__name__
'QATMultiheadAttention'
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litcompress.quantization._base import QuantizedLayer, linear

__all__ = ["QATMultiheadAttention"]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class QATMultiheadAttention(QuantizedLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` converted for quantization-aware training (by
    :func:`~litcompress.quantization.layers.convert_`, never constructed). With ``fake_quant_enabled`` its forward
    fake-quantizes the inputs and weights of the query, key, value and output projections (inputs when
    ``config.activation_bits`` is set); with it off, exactly ``nn.MultiheadAttention.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True)})
    >>> attn = convert_(model, QuantConfig(), ["attn"])["attn"]
    >>> sorted(attn.weight_quantizers), sorted(attn.input_quantizers)
    (['in_proj_weight', 'out_proj.weight'], ['key', 'out_proj', 'query', 'value'])
    >>> attn.fake_quant_enabled = True
    >>> x = torch.randn(2, 5, 8)
    >>> out, weights = attn.train()(x, x, x)  # training mode observes the activation ranges
    >>> out.shape, weights.shape
    (torch.Size([2, 5, 8]), torch.Size([2, 5, 5]))
    """

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend, as ``nn.MultiheadAttention.forward`` (batched inputs only while fake-quantizing).

        Args:
            query: as ``nn.MultiheadAttention``: ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``.
            key: as ``nn.MultiheadAttention``: ``(S, N, kdim)``, or ``(N, S, kdim)`` with ``batch_first``.
            value: as ``nn.MultiheadAttention``: ``(S, N, vdim)``, or ``(N, S, vdim)`` with ``batch_first``.
            key_padding_mask: as ``nn.MultiheadAttention``: ``(N, S)``, ``True`` (or ``-inf``) for keys ignored.
            need_weights: as ``nn.MultiheadAttention``: also return the attention weights.
            attn_mask: as ``nn.MultiheadAttention``: ``(L, S)`` or ``(N * H, L, S)``; boolean ``True`` masks out, a
                float mask is added.
            average_attn_weights: as ``nn.MultiheadAttention``: average the returned weights over the heads.
            is_causal: as ``nn.MultiheadAttention``: a hint that ``attn_mask`` is causal (while fake-quantizing, a
                causal mask is applied when no mask is given).

        Returns:
            The output, shaped like ``query`` with ``embed_dim`` features, and the attention weights (``None``
            unless ``need_weights``).
        """
        if not self.fake_quant_enabled:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        self_attention = key is query and value is query  # before the transpose makes three new tensors
        if not self.batch_first:  # work in (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q_in = self._quantize_input("query", query)
        k_in = q_in if self_attention else self._quantize_input("key", key)
        v_in = q_in if self_attention else self._quantize_input("value", value)
        e = self.embed_dim
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self._quantize_weight("in_proj_weight", self.in_proj_weight).split(e)
        else:
            w_q = self._quantize_weight("q_proj_weight", self.q_proj_weight)
            w_k = self._quantize_weight("k_proj_weight", self.k_proj_weight)
            w_v = self._quantize_weight("v_proj_weight", self.v_proj_weight)
        b_q, b_k, b_v = self.in_proj_bias.split(e) if self.in_proj_bias is not None else (None, None, None)
        n, tq, h = q_in.shape[0], q_in.shape[1], self.num_heads
        exporting = self._exporting()
        q = linear(q_in, w_q, b_q, exporting).view(n, tq, h, -1).transpose(1, 2)  # (N, H, L, D)
        k = linear(k_in, w_k, b_k, exporting).view(n, k_in.shape[1], h, -1).transpose(1, 2)  # (N, H, S, D)
        v = linear(v_in, w_v, b_v, exporting).view(n, v_in.shape[1], h, -1).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (N * H, L, S)
            mask = mask.view(n, h, tq, -1)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if is_causal and mask is None:
                causal = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = out.transpose(1, 2).reshape(n, tq, e)
        w_o = self._quantize_weight("out_proj.weight", self.out_proj.weight)
        out = linear(self._quantize_input("out_proj", out), w_o, self.out_proj.bias, exporting)
        return (out if self.batch_first else out.transpose(0, 1)), weights
