"""The public door into a model's quantized layers: find them, switch fake quantization, freeze them for export.

Everything outside :mod:`litcompress.quantization` (ONNX export, compact files, the report, the QAT callback, the
tests) goes through these functions and the public attributes of :class:`~litcompress.quantization.QuantizedLayer`.

>>> import torch
>>> from torch import nn
>>> from litcompress.quantization import QuantConfig, convert_
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> _ = convert_(model, QuantConfig(activation_bits=None), ["0", "2"])
>>> list(quantized_layers(model))
['0', '2']
>>> with fake_quant(model, True):
...     sorted(quantized_weights(model))
['0.weight', '2.weight']
>>> quantized_weights(model)  # fake quantization is off again outside the block
{}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from litcompress._validation import fail
from litcompress.quantization.layers import QuantizedLayer
from litcompress.quantization.quantizers import WeightQuantizer

__all__ = ["export_mode", "fake_quant", "quantized_layers", "quantized_weights"]


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every layer of ``model`` converted for quantization-aware training, by qualified name (on or off)."""
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def quantized_weights(model: nn.Module) -> dict[str, tuple[WeightQuantizer, Tensor]]:
    """Canonical parameter name -> (quantizer, float weight) for every weight fake-quantized now.

    Layers whose fake quantization is off are left out: their weights are used, saved and exported as floats.
    A weight shared by several layers is listed once, under its canonical ``named_parameters()`` name.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[WeightQuantizer, Tensor]] = {}
    for layer in quantized_layers(model).values():
        if layer.fake_quant_enabled:
            for key, quantizer in layer.weight_quantizers.items():
                weight = layer.weight_tensor(key)
                found.setdefault(names[id(weight)], (quantizer, weight))
    return found


@contextlib.contextmanager
def fake_quant(model: nn.Module, enabled: bool) -> Iterator[dict[str, QuantizedLayer]]:
    """Switch fake quantization on or off in every quantized layer of ``model``; restore each layer's state on exit.

    ``with fake_quant(model, False):`` runs, measures or exports the float model a QAT model was trained from.

    Yields:
        The quantized layers, by name.
    """
    if not isinstance(enabled, bool):
        fail("enabled", "a bool", enabled, exc=TypeError)
    layers = quantized_layers(model)
    before = {name: layer.fake_quant_enabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.fake_quant_enabled = enabled
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            layer.fake_quant_enabled = before[name]


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[int]:
    """Freeze every active quantizer into constants, so a traced graph holds Q/DQ ops on integer weights.

    Inside the block, each quantized weight becomes ``DequantizeLinear`` of its integer values and each observed
    activation a ``QuantizeLinear``/``DequantizeLinear`` pair with fixed scale and zero point: the graph that
    ONNX Runtime fuses into integer kernels. Used by :func:`~litcompress.export.export_onnx`. 8-bit weights are
    stored ``uint8`` with zero point 128 (the same values; ONNX Runtime's ``int8`` kernels saturate on x86 CPUs
    without VNNI), fewer bits as ``int8``: see :attr:`~litcompress.quantization.WeightQuantizer.export_zero_point`.

    Yields:
        The number of layers in export mode.
    """
    layers = [layer for layer in quantized_layers(model).values() if layer.fake_quant_enabled]
    try:
        for layer in layers:
            for key, wq in layer.weight_quantizers.items():
                wq.begin_export(layer.weight_tensor(key))
            for aq in layer.input_quantizers.values():
                if aq.ready:
                    aq.begin_export()
        yield len(layers)
    finally:
        for layer in layers:
            for wq in layer.weight_quantizers.values():
                wq.end_export()
            for aq in layer.input_quantizers.values():
                aq.end_export()
