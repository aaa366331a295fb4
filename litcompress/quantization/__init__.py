"""Quantization in pure torch: fake-quant math, quantizers, and layers converted in place for QAT."""

from litcompress.quantization.fake_quant import fake_quantize, lsq_fake_quantize
from litcompress.quantization.modules import QUANTIZABLE_KINDS, QuantizedLayer, convert_, revert_
from litcompress.quantization.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer

__all__ = [
    "QUANTIZABLE_KINDS",
    "ActivationQuantizer",
    "QuantConfig",
    "QuantizedLayer",
    "WeightQuantizer",
    "convert_",
    "fake_quantize",
    "lsq_fake_quantize",
    "revert_",
]
