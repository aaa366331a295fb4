"""The low-level ONNX writer both :func:`~litcompress.export.export_onnx` and
:func:`~litcompress.export.choose_int8` call: no argument checks, no trial run of the model (the callers check once);
and :func:`write_float_layers`, which makes the candidate files of :func:`~litcompress.export.choose_int8` from its
all-int8 export instead of exporting each (an export of a 6-layer GPT-2 takes about 6 s on 2 CPU cores, a rewrite
well under 1 s).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import warnings
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
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


_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata torch's exporter writes: the module path, a list literal
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _layer_of(node: Any, layers: Collection[str]) -> str | None:
    """The deepest of ``layers`` among the node's name scopes, ``""`` for none; ``None`` without name scopes."""
    text = next((p.value for p in node.metadata_props if p.key == _SCOPES), None)
    try:
        scopes = ast.literal_eval(text) if text is not None else None
    except (ValueError, SyntaxError):
        scopes = None
    if not isinstance(scopes, list):
        return None
    return next((scope for scope in reversed(scopes) if scope in layers), "")


def write_float_layers(source: str | os.PathLike, dest: str | os.PathLike, float_layers: Collection[str],
                       layers: Collection[str]) -> bool:
    """Write to ``dest`` a copy of ``source`` (an export with every one of ``layers`` int8) in which the layers in
    ``float_layers`` compute in float, without exporting again: in each, every DequantizeLinear of an integer
    initializer becomes the float initializer it computes, and every QuantizeLinear -> DequantizeLinear pair is
    bypassed. The weights are the fake-quantized values rather than the float ones: the same kernels, so the same
    latency, but such a file is for timing only. A node belongs to the deepest of ``layers`` among the name scopes
    torch's exporter writes (nodes its optimizer adds have none, and belong to no layer).

    Returns:
        ``False``, writing nothing, when the file cannot be rewritten so: a Q/DQ node without name scopes, a graph
        with functions or subgraphs, a Q/DQ node of those layers other than such a weight or pair, or a tensor
        that reaches both a float layer and one that stays int8 (the caller exports instead).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph, nodes = model.graph, list(model.graph.node)
    if model.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                              for node in nodes for a in node.attribute):
        return False
    owner = [_layer_of(node, layers) for node in nodes]
    if any(o is None and node.op_type in _QDQ for o, node in zip(owner, nodes)):
        return False
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    outputs = {o.name for o in graph.output}

    def reached(i: int) -> set[str]:
        """The layers the outputs of node ``i`` reach first, through nodes of no layer."""
        found: set[str] = set()
        stack, seen = [i], {i}
        while stack:
            for name in nodes[stack.pop()].output:
                for c in consumers.get(name, ()):
                    layer = owner[c]
                    if layer:
                        found.add(layer)
                    elif c not in seen:
                        seen.add(c)
                        stack.append(c)
        return found

    renamed: dict[str, str] = {}  # a bypassed DequantizeLinear's output -> the QuantizeLinear's input
    dropped: set[int] = set()
    folded: list[Any] = []
    for i, node in enumerate(nodes):
        if node.op_type not in _QDQ:
            continue
        if node.op_type == "DequantizeLinear" and len(
                {layer in float_layers for layer in reached(i) | {owner[i] or ""} if layer}) > 1:
            return False  # a weight or an activation that a float layer and an int8 one share
        if owner[i] not in float_layers:
            continue
        if outputs & set(node.output) or any(owner[c] not in float_layers for c in consumers.get(node.output[0], ())
                                             if nodes[c].op_type in _QDQ):
            return False
        if node.op_type == "QuantizeLinear":
            if not consumers.get(node.output[0]) or any(nodes[c].op_type != "DequantizeLinear"
                                                        for c in consumers[node.output[0]]):
                return False
        elif node.input[0] in inits:
            value = _dequantized(node, inits, numpy_helper)
            if value is None:
                return False
            folded.append(numpy_helper.from_array(value, node.output[0]))
        else:  # the second half of a pair
            pair = producer.get(node.input[0])
            if pair is None or nodes[pair].op_type != "QuantizeLinear" or owner[pair] not in float_layers:
                return False
            renamed[node.output[0]] = nodes[pair].input[0]
        dropped.add(i)
    kept = [node for i, node in enumerate(nodes) if i not in dropped]
    for node in kept:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    used = {name for node in kept for name in node.input} | outputs
    remaining = [init for init in graph.initializer if init.name in used] + folded
    gone = set(renamed) | {name for i in dropped for name in nodes[i].output} - {init.name for init in folded}
    value_info = [info for info in graph.value_info if info.name not in gone]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    onnx.save(model, str(dest))
    return True


def _dequantized(node: Any, inits: dict[str, Any], numpy_helper: Any) -> np.ndarray | None:
    """The float32 value of a DequantizeLinear of an 8-bit initializer with initializer scale and zero point
    (``None`` for anything else: blocked scales, other types)."""
    if len(node.input) < 2 or any(name not in inits for name in node.input[1:] if name) or \
            any(a.name == "block_size" and a.i for a in node.attribute):
        return None
    q = numpy_helper.to_array(inits[node.input[0]])
    if q.dtype not in (np.int8, np.uint8):
        return None
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim:  # per channel, along `axis`
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim] = -1
    return ((q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)).astype(np.float32)
