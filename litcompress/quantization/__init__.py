"""Quantization in pure torch: fake-quant math, quantizers, layers converted in place for QAT, compact files.

The public door into a converted model is :func:`quantized_layers`, :func:`quantized_weights`, :func:`fake_quant`
and :func:`export_mode`, plus the attributes of :class:`QuantizedLayer`.
"""

from litcompress.quantization.access import export_mode, fake_quant, quantized_layers, quantized_weights
from litcompress.quantization.functional import fake_quantize, lsq_fake_quantize
from litcompress.quantization.layers import QUANTIZABLE_KINDS, QuantizedLayer, convert_, revert_
from litcompress.quantization.plan import conversion_plan
from litcompress.quantization.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer

__all__ = [
    "QUANTIZABLE_KINDS",
    "ActivationQuantizer",
    "QuantConfig",
    "QuantizedLayer",
    "WeightQuantizer",
    "conversion_plan",
    "convert_",
    "export_mode",
    "fake_quant",
    "fake_quantize",
    "lsq_fake_quantize",
    "quantized_layers",
    "quantized_weights",
    "revert_",
]
