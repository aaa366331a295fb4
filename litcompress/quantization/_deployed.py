"""The quantization a compact file records besides the weights (format 4; private: for ``compact.py``).

A model's quantized layers compute with more than their integer weights: the activations at their inputs (and a
convolution's output) are quantized with ranges observed during training. A file that held only the weights loaded
into a float model that ran float activations: not the model that was trained, nor its ONNX export. So the metadata
of a file of a model whose quantized layers in force quantize activations (any of them) also holds, per such layer
(JSON, under ``"quantization"``, covered by the file's checksum)::

    {"net.0": {"kind": "Linear",                       # the layer's class before conversion
               "config": {"weight_bits": 8, ...},      # its QuantConfig
               "weights": {"weight": "net.0.weight"},  # weight attribute -> the key its integers are stored under
               "activations": {"input": {"lo": -1.5, "hi": 2.0}}}}  # + "scale", "zero_point" when learned

The weights' scales are those stored beside the integer weights. Loading converts each recorded layer (as
:func:`~litcompress.quantization.convert_` does), freezes its weight scales at the file's and restores its activation
quantizers' ranges (and learned steps), which no longer observe, with fake quantization on: the model computes as the
saved one did, and exports the same ONNX file. Floats are written with ``repr`` of their float32 value, so they read
back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from litcompress._validation import fail
from litcompress.quantization._layout import Entry, bad_file
from litcompress.quantization.functional import unsigned_range
from litcompress.quantization.layers import QuantizedLayer, convert_, revert_
from litcompress.quantization.quantizers import ActivationQuantizer, QuantConfig

__all__ = ["FORMAT", "KEY", "LayerRecord", "check_layers", "convert", "parse", "record", "restore"]

FORMAT = "litcompress.compact/4"
KEY = "quantization"
_LAYER_FIELDS = {"kind", "config", "weights", "activations"}
_RANGE, _STEP = {"lo", "hi"}, {"scale", "zero_point"}  # an activation's state: its range, and its learned step
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}


@dataclass(frozen=True)
class LayerRecord:
    """One quantized layer as the file records it (see the module docstring)."""

    kind: str
    config: QuantConfig
    weights: dict[str, str]
    activations: dict[str, dict[str, Any]]


def _number(t: Tensor | None) -> float | int | None:
    if t is None:
        return None
    value = t.detach().cpu().reshape(())  # activation ranges, steps and zero points are scalars (per tensor)
    return int(value) if not value.is_floating_point() else float(value)


def _kind(module: nn.Module) -> str:
    return (module.original_class if isinstance(module, QuantizedLayer) else type(module)).__name__


def record(model: nn.Module, stored_under: Mapping[int, str]) -> dict[str, Any]:
    """Every quantized layer in force of ``model``, as JSON-ready values, when one of them quantizes activations
    (else nothing: weights quantized alone compute, dequantized, exactly what the model computed, and the file stays
    format 3); ``stored_under`` maps a weight tensor's id to the key the file stores it under (a tied weight: its
    first key)."""
    in_force = [m for m in model.modules() if isinstance(m, QuantizedLayer) and m.fake_quant_enabled]
    if not any(m.input_quantizers for m in in_force):
        return {}
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, QuantizedLayer) and module.fake_quant_enabled):
            continue
        configs = [q.config for q in module.weight_quantizers.values()] + [
            q.config for q in module.input_quantizers.values()]
        if not configs:  # converted with nothing to quantize: it computes in float
            continue
        layers[name] = {
            "kind": _kind(module),
            "config": dataclasses.asdict(configs[0]),
            "weights": {key: stored_under[id(module.weight_tensor(key))] for key in module.weight_quantizers},
            "activations": {key: _state(q) for key, q in module.input_quantizers.items()},
        }
    return layers


def _state(q: ActivationQuantizer) -> dict[str, Any]:
    """The observed range (``null`` when none was), and the step and zero point when they are learned (LSQ)."""
    state = {"lo": _number(q.lo), "hi": _number(q.hi)}
    if q.learning:
        state |= {"scale": _number(q.scale), "zero_point": _number(q.zero_point)}
    return state


# ---------------------------------------------------------------------------------------------------------- reading
def parse(text: str, layout: Mapping[str, Entry], path: Path) -> dict[str, LayerRecord]:
    """The records of a file of format 4 (``"{}"`` for earlier formats), every field checked, also against its
    layout."""
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        bad_file(path, f"its {KEY!r} is not valid JSON ({err})")
    if not isinstance(raw, dict):
        bad_file(path, f"its {KEY!r} is a JSON {type(raw).__name__}, not an object of layer names")
    return {name: _layer(name, value, layout, path) for name, value in raw.items()}


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


def _layer(name: str, value: Any, layout: Mapping[str, Entry], path: Path) -> LayerRecord:
    def bad(hint: str) -> NoReturn:
        bad_file(path, f"in its {KEY!r}, the layer `{name}` {hint}")

    if not isinstance(value, dict) or set(value) != _LAYER_FIELDS:
        bad(f"is not an object of the fields {sorted(_LAYER_FIELDS)}")
    kind, config, weights, activations = (value[k] for k in ("kind", "config", "weights", "activations"))
    if not isinstance(kind, str) or not kind:
        bad(f"has kind={kind!r}, not a class name")
    if not isinstance(config, dict) or set(config) != _CONFIG_FIELDS:
        bad(f"has config={config!r}, not an object of the fields {sorted(_CONFIG_FIELDS)}")
    try:
        quant = QuantConfig(**config)
    except (TypeError, ValueError) as err:
        bad(f"has a config QuantConfig refuses: {err}")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weights.items()):
        bad(f"has weights={weights!r}, not an object of weight names")
    for key, stored in weights.items():
        entry = layout.get(stored)
        if entry is None or entry.alias is not None or entry.bits is None:
            bad(f"stores its weight `{key}` under `{stored}`, which the layout does not hold as integer weights")
        if entry.bits != quant.weight_bits:
            bad(f"quantizes `{key}` to {quant.weight_bits} bits, where `{stored}` holds {entry.bits}-bit integers")
        if (entry.axis is None) != (quant.weight_granularity == "per_tensor"):
            bad(f"quantizes `{key}` {quant.weight_granularity}, where `{stored}` holds "
                f"{'one scale' if entry.axis is None else 'scales along axis ' + str(entry.axis)}")
        direct = f"{name}.{key}" if name else key
        own = layout.get(direct)
        if own is None or (own.alias or direct) != stored:
            bad(f"stores its weight `{key}` under `{stored}`, which is not that weight (nor tied to it) in the layout")
    if not isinstance(activations, dict):
        bad(f"has activations={activations!r}, not an object of activation names")
    if activations and quant.activation_bits is None:
        bad("has activation ranges, yet its config quantizes weights only (activation_bits=None)")
    states = {key: _activation(f"{key}", state, quant, bad) for key, state in activations.items()}
    return LayerRecord(kind, quant, dict(weights), states)


def _activation(key: str, state: Any, config: QuantConfig, bad: Callable[[str], NoReturn]) -> dict[str, Any]:
    """The activation's state, values checked (its tensors are made on load)."""
    if not isinstance(state, dict) or set(state) not in (_RANGE, _RANGE | _STEP):
        bad(f"has a state of its activation `{key}` that is not an object of the fields {sorted(_RANGE)}, and "
            f"{sorted(_STEP)} when learned")

    def real(field: str, positive: bool = False) -> float | None:
        v = state.get(field)
        if v is None and field in _RANGE:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            bad(f"has {field}={v!r} for its activation `{key}`, not a finite{' positive' if positive else ''} number")
        return float(v)

    lo, hi = real("lo"), real("hi")
    if (lo is None) != (hi is None) or (lo is not None and hi is not None and lo > hi):
        bad(f"has the range [{lo}, {hi}] for its activation `{key}`: both ends or neither, lo <= hi")
    scale = zero_point = None
    if "scale" in state:
        scale, zero_point = real("scale", positive=True), state["zero_point"]
        qmin, qmax = unsigned_range(config.activation_bits or 8)
        if not (isinstance(zero_point, int) and not isinstance(zero_point, bool) and qmin <= zero_point <= qmax):
            bad(f"has zero_point={zero_point!r} for its activation `{key}`, not an int in [{qmin}, {qmax}]")
    return {"lo": lo, "hi": hi, "scale": scale, "zero_point": zero_point}


# ---------------------------------------------------------------------------------------------------------- loading
def check_layers(model: nn.Module, records: Mapping[str, LayerRecord]) -> None:
    """Each recorded layer exists in ``model``, of the recorded kind, with the recorded weights."""
    modules = dict(model.named_modules())
    for name, rec in records.items():
        module = modules.get(name)
        if module is None:
            fail("model", f"a model with the quantized layer `{name}` of the file", type(model).__name__,
                 hint="load the file into a model built as the one saved")
        if _kind(module) != rec.kind:
            fail("model", f"a model whose `{name}` is a {rec.kind}, as in the file", _kind(module))


Undo = Callable[[], None]


def convert(model: nn.Module, records: Mapping[str, LayerRecord], layout: Mapping[str, Entry]) -> Undo:
    """Convert the recorded layers (a layer converted already keeps its quantizers when they match the record);
    returns what undoes it. Raises ``ValueError``, the model as it was, when a layer does not convert as recorded."""
    modules = dict(model.named_modules())
    saved = {name: (module.__class__, dict(module.__dict__)) for name, module in modules.items()
             if name in records or isinstance(module, QuantizedLayer)}

    def undo() -> None:
        for name, (cls, attrs) in saved.items():
            module = modules[name]
            if not issubclass(cls, QuantizedLayer) and isinstance(module, QuantizedLayer):
                revert_(module)
            module.__class__ = cls
            for attr in ("weight_quantizers", "input_quantizers", "fake_quant_enabled", "original_class"):
                if attr in attrs:
                    module.__dict__[attr] = attrs[attr]

    try:
        for config in dict.fromkeys(rec.config for rec in records.values()):
            todo = {name: list(rec.weights) for name, rec in records.items()
                    if rec.config == config and not _matches(modules[name], rec)}
            if todo:
                convert_(model, config, todo)
        for name, rec in records.items():
            module = modules[name]
            assert isinstance(module, QuantizedLayer)  # converted above
            if set(module.input_quantizers) != set(rec.activations):
                fail("model", f"a model whose `{name}` quantizes the activations {sorted(rec.activations)}, as in "
                     "the file", sorted(module.input_quantizers), hint="load the file into a model built as the one "
                     "saved")
            for key, stored in rec.weights.items():
                axis = module.weight_quantizers[key].axis
                if axis != layout[stored].axis:
                    fail("model", f"a model whose `{name}.{key}` has its output channels along axis "
                         f"{layout[stored].axis}, as in the file", f"axis {axis}")
    except (ValueError, AttributeError, KeyError) as err:
        undo()
        if isinstance(err, ValueError) and str(err).startswith("Expected argument `model`"):
            raise
        fail("model", "a model whose layers convert as the file's quantized layers did", type(model).__name__,
             hint=f"{type(err).__name__}: {err}")
    return undo


def _matches(module: nn.Module, rec: LayerRecord) -> bool:
    """Whether ``module`` is converted already with the record's config, weights and activations."""
    return (isinstance(module, QuantizedLayer) and set(module.weight_quantizers) == set(rec.weights)
            and set(module.input_quantizers) == set(rec.activations)
            and all(q.config == rec.config for q in module.weight_quantizers.values())
            and all(q.config == rec.config for q in module.input_quantizers.values()))


def restore(model: nn.Module, records: Mapping[str, LayerRecord], scales: Mapping[str, Tensor]) -> None:
    """Freeze each recorded weight quantizer at the file's scales (``scales``: by stored key), restore the
    activation quantizers, and turn fake quantization on in the recorded layers and off in the model's others."""
    shared: dict[str, Any] = {}  # stored key -> its quantizer: a tied weight has one, as convert_ makes it
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLayer):
            continue
        rec = records.get(name)
        module.fake_quant_enabled = rec is not None
        if rec is None:
            continue
        device = next(iter(module.parameters()), torch.empty(0)).device
        for key, stored in rec.weights.items():
            if stored in shared:
                module.weight_quantizers[key] = shared[stored]
                continue
            quantizer = shared[stored] = module.weight_quantizers[key]
            quantizer.load_state_dict({"scale": scales[stored].to(device), "learning": False, "frozen": True})
        for key, state in rec.activations.items():
            module.input_quantizers[key].load_state_dict(_tensors(state, device))


def _tensors(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def make(v: float | int | None, dtype: torch.dtype) -> Tensor | None:
        return None if v is None else torch.tensor(v, dtype=dtype, device=device)

    # deployed: the ranges stay as the file has them (no observing); a learned step keeps computing as it did
    return {"lo": make(state["lo"], torch.float32), "hi": make(state["hi"], torch.float32),
            "scale": make(state["scale"], torch.float32), "zero_point": make(state["zero_point"], torch.int32),
            "learning": state["scale"] is not None, "observing": False}
