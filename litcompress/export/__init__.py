"""Deployment: ONNX files that ONNX Runtime runs on integer kernels where they pay, and compact weight files.

- :func:`export_onnx` writes one self-contained ``.onnx`` file; :func:`choose_int8` measures, per quantized layer,
  whether int8 or float runs faster in ONNX Runtime, and ``export_onnx(..., int8=choice)`` writes that choice.
- :func:`save_compressed` / :func:`load_compressed` (from :mod:`litcompress.quantization.compact`) write and read
  the compact weight file: exact sparse positions, integer weights, safetensors inside.

>>> import torch
>>> from torch import nn
>>> path = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4), "doctest_float.onnx")
>>> path.stat().st_size > 0
True
>>> path.unlink()
"""

from litcompress.export.choice import Int8Choice, LayerTiming, Measure, choose_int8
from litcompress.export.onnx import export_onnx
from litcompress.quantization.compact import load_compressed, save_compressed

__all__ = ["Int8Choice", "LayerTiming", "Measure", "choose_int8", "export_onnx", "load_compressed", "save_compressed"]
