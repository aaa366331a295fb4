"""Deployment: ONNX files that ONNX Runtime runs on integer kernels, and compact weight files.

>>> import torch
>>> from torch import nn
>>> path = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4), "doctest_float.onnx")
>>> path.stat().st_size > 0
True
>>> path.unlink()
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from litcompress._compat import qdq_ops
from litcompress._validation import fail
from litcompress.quantization.access import export_mode
from litcompress.quantization.compact import load_compressed, save_compressed

__all__ = ["export_onnx", "load_compressed", "save_compressed"]


def export_onnx(
    model: nn.Module, example_input: Tensor, path: str | os.PathLike, dynamic_batch: bool = True
) -> Path:
    """Export ``model`` to one self-contained ``.onnx`` file (weights inside, no ``.onnx.data``).

    A model trained with :class:`~litcompress.callbacks.QuantizationAwareTraining` exports with
    QuantizeLinear/DequantizeLinear pairs around every quantized matrix product and int8 weight initializers;
    ONNX Runtime's graph optimizations turn them into integer kernels. A float model exports as plain fp32.

    Args:
        model: the model (a LightningModule works; its ``forward`` is exported), put in eval mode for export.
        example_input: one input batch; its shape and dtype define the graph's input.
        path: where to write the file.
        dynamic_batch: let the first dimension of the input vary.

    Returns:
        The path written.
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    if not isinstance(example_input, Tensor):
        fail("example_input", "a torch.Tensor", type(example_input).__name__, exc=TypeError)
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)  # fail here, with the model's own message, if the input does not fit
        dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        qdq_ops()  # registered before tracing begins
        with export_mode(model), torch.no_grad():
            torch.onnx.export(model, (example_input,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=dynamic, verbose=False)
    finally:
        model.train(was_training)
    return path
