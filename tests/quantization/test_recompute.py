"""Fake-quantized weights recomputed in backward (what QAT does for FSDP2-sharded layers): the same gradients as
keeping them, and none of them kept from forward to backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litcompress.quantization import _recompute
from litcompress.quantization.layers import QuantizedLayer, convert_
from litcompress.quantization.quantizers import QuantConfig

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "conv": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 6, 6)),
    "attention": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), lambda: torch.randn(2, 5, 8)),
    "lstm": (lambda: nn.LSTM(4, 6, batch_first=True), lambda: torch.randn(2, 3, 4)),
}


def _run(kind: str, recompute: bool, weight_bits: int = 4) -> tuple[list[torch.Tensor], int]:
    build, data = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(build())
    x = data().requires_grad_()  # an inner layer: its input needs a gradient, so its weight is saved
    convert_(model, QuantConfig(weight_bits=weight_bits, activation_bits=None), ["0"])
    layer = model[0]
    assert isinstance(layer, QuantizedLayer)
    layer.fake_quant_enabled = True
    layer.recompute_weights = recompute
    if kind == "attention":
        out = layer(x, x, x, need_weights=False)[0]
    elif kind == "lstm":
        out = layer(x)[0]
    else:
        out = layer(x)
    calls = []
    original = _recompute._Recipe.__call__

    def counted(self):
        calls.append(1)
        return original(self)

    _recompute._Recipe.__call__ = counted
    try:
        (out.square().sum()).backward()
    finally:
        _recompute._Recipe.__call__ = original
    return [p.grad.clone() for p in layer.parameters()], len(calls)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_recomputed_weights_give_the_same_gradients(kind):
    kept, none = _run(kind, recompute=False)
    recomputed, calls = _run(kind, recompute=True)
    assert none == 0 and calls >= 1  # the fake-quantized weights were rebuilt in backward, not kept
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
