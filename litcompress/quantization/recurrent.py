"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) converted in place for quantization-aware training
(by :func:`~litcompress.quantization.layers.convert_`). Weight-only: the recurrent kernel runs on fake-quantized
copies of the weight matrices; biases, inputs and states stay float.

>>> import torch
>>> from torch import nn
>>> from litcompress.quantization import QuantConfig, convert_
>>> model = nn.Sequential(nn.GRU(4, 8))
>>> type(convert_(model, QuantConfig(), ["0"])["0"]).__name__
'QATGRU'
"""

from __future__ import annotations

from typing import Any

from torch import nn

from litcompress._compat import rnn_forward
from litcompress.quantization._base import QuantizedLayer

__all__ = ["QATGRU", "QATLSTM", "QATRNN"]


class _QATRNN(QuantizedLayer, nn.RNNBase):
    """Weight-only: the recurrent kernel runs on fake-quantized copies of the weight matrices."""

    def forward(self, x: Any, hx: Any = None) -> Any:  # as the LSTM / GRU / RNN forward it wraps
        if not self.fake_quant_enabled:
            return super().forward(x, hx)
        weights = {k: self._quantize_weight(k, self.weight_tensor(k)) for k in self.weight_quantizers}
        return rnn_forward(self, super().forward, weights, x, hx)


class QATLSTM(_QATRNN, nn.LSTM):
    """``nn.LSTM`` converted for quantization-aware training (by :func:`convert_`, never constructed). Weight-only:
    with ``fake_quant_enabled`` the recurrent kernel runs on fake-quantized copies of every ``weight_ih_l*`` /
    ``weight_hh_l*`` matrix (biases and activations stay float); with it off, exactly ``nn.LSTM.forward``. Inputs,
    outputs and the ``(h, c)`` state are those of ``nn.LSTM``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.LSTM(4, 8))
    >>> lstm = convert_(model, QuantConfig(), ["0"])["0"]
    >>> type(lstm).__name__, sorted(lstm.weight_quantizers), lstm.input_quantizers
    ('QATLSTM', ['weight_hh_l0', 'weight_ih_l0'], {})
    >>> lstm.fake_quant_enabled = True
    >>> out, (h, c) = lstm(torch.randn(5, 2, 4))  # (L, N, H_in), as nn.LSTM
    >>> out.shape, h.shape
    (torch.Size([5, 2, 8]), torch.Size([1, 2, 8]))
    """


class QATGRU(_QATRNN, nn.GRU):
    """``nn.GRU`` converted for quantization-aware training (by :func:`convert_`, never constructed). Weight-only:
    with ``fake_quant_enabled`` the recurrent kernel runs on fake-quantized copies of its weight matrices (biases
    and activations stay float); with it off, exactly ``nn.GRU.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.GRU(4, 8, batch_first=True))
    >>> gru = convert_(model, QuantConfig(weight_bits=4), ["0"])["0"]
    >>> gru.fake_quant_enabled = True
    >>> out, h = gru(torch.randn(2, 5, 4))
    >>> type(gru).__name__, out.shape
    ('QATGRU', torch.Size([2, 5, 8]))
    """


class QATRNN(_QATRNN, nn.RNN):
    """``nn.RNN`` (Elman) converted for quantization-aware training (by :func:`convert_`, never constructed).
    Weight-only: with ``fake_quant_enabled`` the recurrent kernel runs on fake-quantized copies of its weight
    matrices; with it off, exactly ``nn.RNN.forward``. :func:`revert_` gives the layer its original class back.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_, revert_
    >>> model = nn.Sequential(nn.RNN(4, 8))
    >>> rnn = convert_(model, QuantConfig(), ["0"])["0"]
    >>> x = torch.randn(5, 2, 4)
    >>> rnn.fake_quant_enabled = True
    >>> type(rnn).__name__, rnn(x)[0].shape
    ('QATRNN', torch.Size([5, 2, 8]))
    >>> revert_(rnn)  # the same object, its class restored
    >>> type(model[0]).__name__
    'RNN'
    """
