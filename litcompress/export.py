"""Deployment: ONNX files that ONNX Runtime runs on integer kernels, and compact weight files.

>>> import torch
>>> from torch import nn
>>> path = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4), "doctest_float.onnx")
>>> path.stat().st_size > 0
True
>>> path.unlink()
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from litcompress._compat import qdq_ops
from litcompress._extras import ONNX_EXPORT, require
from litcompress._validation import fail
from litcompress.quantization.access import export_mode
from litcompress.quantization.compact import load_compressed, save_compressed

__all__ = ["export_onnx", "load_compressed", "save_compressed"]


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what torch's ONNX exporter says on every call that is not about the model: it skips torchvision's
    ops when torchvision is absent (four log lines), and torch's own deprecation warnings from its tracing code.
    Errors, and warnings about the model, still come through."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)
            # recurrent layers swap their weight list while traced (torch's own LSTM/GRU, and QAT's weights)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights\[",
                                    category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


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
    require(*ONNX_EXPORT, what="export_onnx")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)  # fail here, with the model's own message, if the input does not fit
        dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        qdq_ops()  # registered before tracing begins
        with export_mode(model), torch.no_grad(), _quiet_export():
            torch.onnx.export(model, (example_input,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=dynamic, verbose=False)
    finally:
        model.train(was_training)
    return path
