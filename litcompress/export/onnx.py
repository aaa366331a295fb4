"""`export_onnx`: one self-contained ONNX file that ONNX Runtime runs on integer kernels where they pay.

>>> import torch
>>> from torch import nn
>>> path = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4), "doctest_float.onnx", dynamic_batch=False)
>>> path.stat().st_size > 0
True
>>> path.unlink()
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from litcompress._calls import batch_call
from litcompress._extras import ONNX_EXPORT, ONNX_RUNTIME, install_hint, missing, require
from litcompress._timing import ort_latencies
from litcompress._validation import check_bool, fail
from litcompress.distributed import gather_model
from litcompress.export._writer import check_runs, write_onnx
from litcompress.export.choice import Int8Choice, choose_int8
from litcompress.quantization.access import quantized_layers

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)

_ROUNDS, _RUNS = 5, 6  # the default's check: rounds in which each file runs once untimed, then _RUNS times timed
_NOISE = 0.05  # the default's check warns when the int8 file is slower by more than this (timing noise below it)


def _int8_layers(model: nn.Module, int8: Any, example_input: Tensor | Mapping[str, Tensor],
                 dynamic_batch: bool) -> Collection[str] | None:
    """The layers ``export_onnx(int8=...)`` keeps int8 (``None``: every one in force)."""
    if int8 is None:
        return None
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


def export_onnx(
    model: nn.Module,
    example_input: Tensor | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    int8: Literal["all", "none", "auto"] | Int8Choice | Collection[str] | None = None,
) -> Path:
    """Export ``model`` to one self-contained ``.onnx`` file (weights inside, no ``.onnx.data``).

    A model trained with :class:`~litcompress.callbacks.QuantizationAwareTraining` exports with
    QuantizeLinear/DequantizeLinear pairs around every quantized matrix product and integer weight initializers
    (8-bit weights as ``uint8`` with zero point 128, fewer bits as ``int8``: the values trained, on kernels that
    ONNX Runtime runs exactly on every CPU; see
    :attr:`~litcompress.quantization.WeightQuantizer.export_zero_point`); ONNX Runtime's graph optimizations turn
    them into integer kernels. A float model exports as plain fp32.

    Integer kernels pay on wide layers only: ``int8="auto"`` (or ``int8=choose_int8(...)``, which also returns the
    per-layer timings) keeps int8 only on the layers where ONNX Runtime runs the model faster that way, and never
    exports a file slower than the all-float export (see :func:`~litcompress.export.choose_int8`).

    The default writes every quantized layer int8, the model that was trained and validated, and never a file
    slower than the fp32 export without saying so: it also exports the fp32 file (to a temporary folder) and times
    both in ONNX Runtime on ``example_input`` (30 runs each, in alternating rounds; ``torch.get_num_threads()``
    threads). When the int8 file runs slower by more than 5% (timing noise below that: the INFO log gives the
    numbers), a ``UserWarning`` gives both latencies and the ways out:
    ``int8="auto"`` or ``int8="none"``, whose float layers compute with the float weights (not the fake-quantized
    ones) and float activations. ``int8="all"`` writes the same file without the check. A model without quantized
    layers in force exports as fp32, unchecked.

    Args:
        model: the model (a LightningModule works; its ``forward`` is exported), put in eval mode for export.
        example_input: one input batch; its shape and dtype define the graph's input. A mapping of tensors
            (e.g. ``{"input_ids": ..., "attention_mask": ...}``) is passed as keyword arguments, as a Hugging Face
            model takes them, and each becomes a graph input of that name.
        path: where to write the file.
        dynamic_batch: let the first dimension of the input vary.
        int8: which quantized layers (those with fake quantization on) export with Q/DQ pairs and integer weights;
            the others export as float (their float weights, no QuantizeLinear). ``None`` (the default: every one,
            timed against the fp32 export as above), ``"all"`` (every one, not timed), ``"none"`` (the fp32 export
            of the same model), ``"auto"`` (:func:`~litcompress.export.choose_int8` on ``example_input`` with its
            defaults, so pass a real batch at the deployed batch size; its table is logged at INFO), an
            :class:`~litcompress.export.Int8Choice`, or a list of layer names.

    A model sharded with FSDP2 is gathered to rank zero first (:func:`~litcompress.distributed.gather_model`:
    call this on every process; rank zero writes the file).

    Returns:
        The path written.
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    args, kwargs = batch_call(example_input)
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
        check_runs(model, args, kwargs)  # a mismatched input fails here, with the model's own message
        write_onnx(model, args, kwargs, path, dynamic_batch=dynamic_batch, int8_layers=keep)
        if int8 is None and any(layer.fake_quant_enabled for layer in quantized_layers(model).values()):
            _check_speed(model, args, kwargs, path, dynamic_batch)
    finally:
        model.train(was_training)
    return path


def _check_speed(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor], path: Path,
                 dynamic_batch: bool) -> None:
    """Time the int8 file at ``path`` against the model's fp32 export; warn, with both latencies, when it is slower
    (or when it cannot be timed)."""
    absent = missing(*ONNX_RUNTIME)
    if absent:
        warnings.warn(f"export_onnx: {path.name} was not timed against the fp32 export, so it may run slower: "
                      f"{', '.join(absent)} is not installed ({install_hint(absent)}). Pass int8='all' to export "
                      "int8 without this check.", stacklevel=3)
        return
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        try:
            write_onnx(model, args, kwargs, fp32, dynamic_batch=dynamic_batch, int8_layers=())
            int8_s, fp32_s = _time_files([path, fp32], args, kwargs, threads)
        except Exception as err:  # the file is written; the check says why it could not be done
            warnings.warn(f"export_onnx: wrote {path.name}, but could not time it against the fp32 export in ONNX "
                          f"Runtime: {type(err).__name__}: {str(err).splitlines()[0][:300]}", stacklevel=3)
            return
    batch = len([*args, *kwargs.values()][0])
    measured = (f"{1e3 * int8_s:.3f} ms vs {1e3 * fp32_s:.3f} ms for the fp32 export, per batch of {batch} with "
                f"{threads} threads on this machine")
    if int8_s > fp32_s * (1 + _NOISE):
        warnings.warn(f"export_onnx: the int8 file {path.name} runs {int8_s / fp32_s:.1f}x slower than the fp32 "
                      f"export of the same model in ONNX Runtime ({measured}). int8='auto' keeps int8 only on the "
                      "layers where it pays (choose_int8), int8='none' writes the fp32 file: their float layers "
                      "compute with the float weights and activations, not the fake-quantized ones. int8='all' "
                      "writes this file without the check.", stacklevel=3)
    elif int8_s > fp32_s:
        logger.info("export_onnx: %s runs about as fast as the fp32 export in ONNX Runtime (%s)", path.name, measured)
    else:
        logger.info("export_onnx: %s runs %.1fx faster than the fp32 export in ONNX Runtime (%s)", path.name,
                    fp32_s / int8_s, measured)


def _time_files(paths: Sequence[Path], args: tuple[Tensor, ...], kwargs: dict[str, Tensor],
                threads: int) -> list[float]:
    """Median seconds per run of each file (:func:`~litcompress._timing.ort_latencies`): ``_ROUNDS`` rounds, in each
    of which every file runs once untimed, then ``_RUNS`` times timed."""
    return ort_latencies(paths, args, kwargs, threads, _RUNS, 1, _ROUNDS)
