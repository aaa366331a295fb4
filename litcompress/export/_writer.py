"""The low-level ONNX writer both :func:`~litcompress.export.export_onnx` and
:func:`~litcompress.export.choose_int8` call: no argument checks, no trial run of the model (the callers check once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._compat import qdq_ops
from litcompress._validation import fail
from litcompress.quantization.access import export_mode, quantized_layers

__all__: list[str] = []


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what torch's ONNX exporter says on every call that is not about the model: it skips torchvision's
    ops when torchvision is absent (four log lines), onnxscript's constant folder says when it leaves a node unfolded
    ("Evaluation failed", e.g. BERT's attention mask), and torch's own deprecation warnings from its tracing code.
    Errors, and warnings about the model, still come through."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx._internal.exporter._registration",
                                                    "onnxscript.optimizer._constant_folding")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)
            # recurrent layers swap their weight list while traced (torch's own LSTM/GRU, and QAT's weights)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights\[",
                                    category=UserWarning)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models return a key/value cache object by default, which ``torch.export`` cannot trace (and an
    ONNX graph of one forward does not need): ``config.use_cache`` is off while exporting, restored after."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False):
            configs[id(config)] = config
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


@contextlib.contextmanager
def _int8_only(model: nn.Module, int8: Collection[str] | None) -> Iterator[None]:
    """Fake quantization off, until the block ends, in every quantized layer in force not named in ``int8`` (those
    export as float); ``None`` changes nothing."""
    switched = [] if int8 is None else [layer for name, layer in quantized_layers(model).items()
                                        if layer.fake_quant_enabled and name not in int8]
    for layer in switched:
        layer.fake_quant_enabled = False
    try:
        yield
    finally:
        for layer in switched:
            layer.fake_quant_enabled = True


def check_runs(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> None:
    """Run ``model`` (in eval mode) once on the input, so that a mismatched input fails with the model's own message
    before any export."""
    with torch.no_grad():
        try:
            model(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            shown = {k: (tuple(v.shape), str(v.dtype)) for k, v in kwargs.items()} or [
                (tuple(a.shape), str(a.dtype)) for a in args]
            fail("example_input", "an input the model accepts", shown,
                 hint=f"the model's forward failed on it: {type(err).__name__}: {err}")


def write_onnx(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor], path: str | os.PathLike,
               *, dynamic_batch: bool, int8_layers: Collection[str] | None) -> None:
    """Write ``model`` (already in eval mode, already checked to run on the input) to ``path``: quantized layers
    in ``int8_layers`` (``None``: every one in force) with Q/DQ pairs, the others as float."""
    batch = torch.export.Dim("batch", min=1)
    dynamic: Any = None
    if dynamic_batch:
        dynamic = tuple({0: batch} for _ in args) if args else {k: {0: batch} for k in kwargs}
    qdq_ops()  # registered before tracing begins
    with _int8_only(model, int8_layers), export_mode(model), torch.no_grad(), _quiet_export(), _no_kv_cache(model):
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, external_data=False,
                          dynamic_shapes=dynamic, verbose=False)
