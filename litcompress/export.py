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
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from litcompress._compat import qdq_ops
from litcompress._extras import ONNX_EXPORT, require
from litcompress._validation import check_bool, fail
from litcompress.distributed import gather_model
from litcompress.export_choice import Int8Choice, LayerTiming, choose_int8
from litcompress.quantization.access import export_mode, quantized_layers
from litcompress.quantization.compact import load_compressed, save_compressed

__all__ = ["Int8Choice", "LayerTiming", "as_call", "choose_int8", "export_onnx", "load_compressed", "save_compressed"]

logger = logging.getLogger(__name__)


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


def _int8_layers(model: nn.Module, int8: Any, example_input: Tensor | Mapping[str, Tensor],
                 dynamic_batch: bool) -> Collection[str] | None:
    """The layers ``export_onnx(int8=...)`` keeps int8 (``None``: every one in force)."""
    if isinstance(int8, str):
        if int8 not in ("all", "none", "auto"):
            fail("int8", "'all', 'none', 'auto', an Int8Choice or a list of quantized layer names", int8,
                 hint="'auto' times int8 against float per layer and keeps the faster")
        if int8 == "all":
            return None
        if int8 == "none":
            return ()
        choice = choose_int8(model, example_input, dynamic_batch=dynamic_batch)
        logger.info("export_onnx(int8='auto') chose:\n%s", choice)
        return choice.int8_layers
    names = int8.int8_layers if isinstance(int8, Int8Choice) else int8
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
        fail("int8", "'all', 'none', 'auto', an Int8Choice or a list of quantized layer names",
             type(int8).__name__, exc=TypeError)
    in_force = [name for name, layer in quantized_layers(model).items() if layer.fake_quant_enabled]
    unknown = sorted(set(names) - set(in_force))
    if unknown:
        fail("int8", "names of this model's quantized layers with fake quantization on", unknown,
             hint=f"those are {in_force}" if in_force else "this model has none: pass int8='all'")
    return names


def as_call(example_input: Tensor | Mapping[str, Tensor]) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` that call a model on ``example_input``: a tensor positionally, a mapping as keywords.

    >>> as_call(torch.zeros(2, 3))[0][0].shape, as_call({"input_ids": torch.zeros(2, 3)})[1].keys()
    (torch.Size([2, 3]), dict_keys(['input_ids']))
    """
    if isinstance(example_input, Tensor) and example_input.dim() > 0:
        return (example_input,), {}
    if isinstance(example_input, Mapping) and example_input and all(
            isinstance(k, str) and isinstance(v, Tensor) and v.dim() > 0 for k, v in example_input.items()):
        return (), dict(example_input)
    fail("example_input", "a tensor whose first dimension is the batch, or a mapping of names to such tensors",
         type(example_input).__name__, exc=TypeError)


def export_onnx(
    model: nn.Module,
    example_input: Tensor | Mapping[str, Tensor],
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    *,
    int8: Literal["all", "none", "auto"] | Int8Choice | Collection[str] = "all",
) -> Path:
    """Export ``model`` to one self-contained ``.onnx`` file (weights inside, no ``.onnx.data``).

    A model trained with :class:`~litcompress.callbacks.QuantizationAwareTraining` exports with
    QuantizeLinear/DequantizeLinear pairs around every quantized matrix product and int8 weight initializers;
    ONNX Runtime's graph optimizations turn them into integer kernels. A float model exports as plain fp32.

    Integer kernels pay on wide layers only: ``int8="auto"`` (or ``int8=choose_int8(...)``, which also returns the
    per-layer timings) keeps int8 only on the layers where ONNX Runtime runs the model faster that way, and never
    exports a file slower than the all-float export (see :func:`~litcompress.export_choice.choose_int8`).

    Args:
        model: the model (a LightningModule works; its ``forward`` is exported), put in eval mode for export.
        example_input: one input batch; its shape and dtype define the graph's input. A mapping of tensors
            (e.g. ``{"input_ids": ..., "attention_mask": ...}``) is passed as keyword arguments, as a Hugging Face
            model takes them, and each becomes a graph input of that name.
        path: where to write the file.
        dynamic_batch: let the first dimension of the input vary.
        int8: which quantized layers (those with fake quantization on) export with Q/DQ pairs and int8 weights;
            the others export as float (their float weights, no QuantizeLinear). ``"all"`` (the default), ``"none"``
            (the fp32 export of the same model), ``"auto"`` (:func:`~litcompress.export_choice.choose_int8` on
            ``example_input`` with its defaults, so pass a real batch at the deployed batch size; its table is
            logged at INFO), an :class:`~litcompress.export_choice.Int8Choice`, or a list of layer names.

    A model sharded with FSDP2 is gathered to rank zero first (:func:`~litcompress.distributed.gather_model`:
    call this on every process; rank zero writes the file).

    Returns:
        The path written.
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    args, kwargs = as_call(example_input)
    if not isinstance(path, (str, os.PathLike)):
        fail("path", "a file path", path, exc=TypeError)
    path = Path(path)
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK) or path.is_dir():
        fail("path", "a file path in an existing, writable folder", str(path),
              hint="create the folder first" if not path.parent.is_dir() else "choose a writable file path")
    require(*ONNX_EXPORT, what="export_onnx")
    check_bool("dynamic_batch", dynamic_batch)
    whole = gather_model(model)  # FSDP2 shards: gathered to rank zero, which exports; the others return
    if whole is None:
        return path
    model = whole
    keep = _int8_layers(model, int8, example_input, dynamic_batch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:  # checked before exporting: a mismatched input fails here, with the model's own message
                model(*args, **kwargs)
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                shown = {k: (tuple(v.shape), str(v.dtype)) for k, v in kwargs.items()} or [
                    (tuple(a.shape), str(a.dtype)) for a in args]
                fail("example_input", "an input the model accepts", shown,
                     hint=f"the model's forward failed on it: {type(err).__name__}: {err}")
        batch = torch.export.Dim("batch", min=1)
        dynamic: Any = None
        if dynamic_batch:
            dynamic = ({0: batch},) if args else {k: {0: batch} for k in kwargs}
        qdq_ops()  # registered before tracing begins
        with _int8_only(model, keep), export_mode(model), torch.no_grad(), _quiet_export(), _no_kv_cache(model):
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic, verbose=False)
    finally:
        model.train(was_training)
    return path
