"""Compact weight files: integer weights, their scales and packed sparsity in one safetensors file.

Each tensor of ``model.state_dict()`` is stored in the smallest of these forms:

- quantized layers: integer weights (``int8``; two values per byte when 4 bits or fewer) and their scales, per
  tensor or per channel along the axis the layout records (``"axis"``: 0 for Linear/Conv, 1 for Conv1D);
- other tensors: as they are;
- either one, when pruning made it sparse (and that is smaller): the nonzero values only, and their positions in
  the encoding that takes the fewest bytes for that tensor, measured: a bitmask (1 bit per element), the gaps
  between successive nonzeros or the lengths of the runs of zeros and nonzeros, in codes of as many bits as suit
  it (see ``_positions.py``; the layout says ``"sparse": true`` for a bitmask, else ``"gaps"`` or ``"runs"``: the
  bits of a code, and ``"codes"``: how many). Files of formats 1 and 2 (bitmasks only) are still read;
- a tensor held under several keys (tied weights, such as an input embedding and its LM head): stored once, under
  its first key; the layout marks the others ``{"alias": <first key>}`` and loading ties them again.

The layout is described in the file's metadata (JSON), with a SHA-256 checksum of the layout and the tensors (files
written before it have none); nothing is ever unpickled. A model whose quantized layers in force quantize activations
is written in format 4: the metadata also records those layers (their config, and the ranges of the activations they
quantize; see ``_deployed.py``), so that loading gives back the model that computed, not only its weights. Any other
model (float, or with weights quantized alone, which dequantized compute exactly what the model computed) is written
in format 3, which earlier releases read too. Loading checks every field and every tensor against the
layout and the model before it writes anything into the model (see ``_layout.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from litcompress._extras import require
from litcompress._validation import fail
from litcompress.distributed import gather_model
from litcompress.quantization import _deployed, _positions
from litcompress.quantization._layout import (
    FORMAT,
    READABLE,
    Entry,
    bad_file,
    check_model,
    checksum,
    parse_layout,
    read_metadata,
)
from litcompress.quantization.access import quantized_weights

__all__ = ["load_compressed", "save_compressed"]


def _pack_int4(values: Tensor) -> Tensor:
    v = (values.reshape(-1).to(torch.int16) + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]
    v = torch.cat([v, v.new_zeros(v.numel() % 2)])
    return v[0::2] | (v[1::2] << 4)


def _unpack_int4(packed: Tensor, n: int) -> Tensor:
    out = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n]
    return out.to(torch.int16).sub(8).to(torch.int8)


def _scale_shape(scale: Tensor, ndim: int, axis: int) -> Tensor:
    if not scale.dim():
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _value_bytes(count: int, flat: Tensor, int4: bool) -> int:
    """The bytes of ``count`` values of ``flat`` (4-bit ones: two per byte)."""
    return -(-count // 2) if int4 else count * flat.element_size()


def _same_tensor_key(value: Tensor) -> tuple[Any, ...] | None:
    """What identifies ``value``'s memory exactly (two keys, one tensor); ``None`` for an empty tensor."""
    if not value.numel():
        return None
    return (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
            value.stride(), value.dtype)


def save_compressed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights in compact form (see the module docstring); returns the path.

    A tensor tied between modules is written once (the other keys are aliases of it), so the file of a model
    whose input embedding and LM head share a weight holds that weight once. A model sharded with FSDP2 is
    gathered to rank zero first (:func:`~litcompress.distributed.gather_model`: call this on every process).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(256, 256)
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(torch.rand(256, 256) > 0.9)  # 90% zeros
    >>> path = save_compressed(model, "doctest.safetensors")
    >>> path.stat().st_size < 256 * 256 * 4 / 4  # under a quarter of the fp32 weights
    True
    >>> torch.equal(load_compressed(nn.Linear(256, 256), path).weight, model.weight)
    True
    >>> path.unlink()
    """
    require("safetensors", what="save_compressed")
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    whole = gather_model(model)  # FSDP2 shards: gathered to rank zero, which writes; the others return
    if whole is None:
        return Path(path)
    model = whole
    quantized = {id(w): (q, w) for q, w in quantized_weights(model).values()}
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    first: dict[Any, str] = {}  # a tensor's identity -> the first key it was stored under
    storages: set[int] = set()
    for name, live in model.state_dict(keep_vars=True).items():
        value = live.detach()
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        key = _same_tensor_key(value)
        same = first.get(id(live)) or first.get(key)
        if same is not None:  # tied: the same tensor under another key
            layout[name] = entry | {"alias": same}
            continue
        first[id(live)] = name
        if key is not None:
            first[key] = name
        value = value.cpu()
        if id(live) in quantized:
            q, w = quantized[id(live)]
            ints, scale = q.integers(w.detach())
            values, entry["bits"] = ints.cpu(), q.config.weight_bits
            if scale.dim():
                entry["axis"] = q.axis
            tensors[f"{name}:scale"] = scale.cpu().contiguous()
        else:
            values = value
        flat = values.reshape(-1)
        int4 = entry.get("bits", 8) <= 4
        if flat.numel():
            nonzero = flat != 0  # a float -0.0 is a zero (pruning leaves one per negative weight): it loads as 0.0
            count = int(nonzero.sum())
            kind, width, size = _positions.smallest(nonzero)
            if size + _value_bytes(count, flat, int4) < _value_bytes(flat.numel(), flat, int4):
                tensors[f"{name}:{kind}"], codes = _positions.encode(nonzero, kind, width)
                entry.update({"sparse": True} if kind == "mask" else {kind: width, "codes": codes})
                flat = flat[nonzero]
        if int4:
            entry["count"] = flat.numel()
            flat = _pack_int4(flat)
        flat = flat.contiguous()
        if flat.numel() and flat.untyped_storage().data_ptr() in storages:  # overlaps a tensor stored already
            flat = flat.clone()
        storages.add(flat.untyped_storage().data_ptr())
        tensors[f"{name}:values"] = flat
        layout[name] = entry
    path = Path(path)
    text = json.dumps(layout, separators=(",", ":"))
    quantization = _deployed.record(model, first)
    if quantization:  # format 4: the quantized layers too
        extra = json.dumps(quantization, separators=(",", ":"))
        metadata = {"format": _deployed.FORMAT, "layout": text, _deployed.KEY: extra,
                    "sha256": checksum(_deployed.FORMAT, json.dumps([text, extra]), tensors)}
    else:
        metadata = {"format": FORMAT, "layout": text, "sha256": checksum(FORMAT, text, tensors)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_compressed` file into ``model`` (in place; also returned).

    The model comes first, as in :func:`save_compressed` and safetensors' own ``load_model(model, filename)``.

    Quantized weights come back as ``integers * scale``: exactly the fake-quantized weights that were trained.
    Keys the file marks as aliases of another (tied weights) get that tensor, and are tied again: a parameter
    of ``model`` that is a separate tensor there is replaced by the one it aliases, so both owners share it.

    The model that computed comes back, not only its weights. The file of a model whose quantized layers quantize
    activations (format 4) records those layers: each is converted as :func:`~litcompress.quantization.convert_`
    does (a plain ``nn.Linear`` becomes a ``QATLinear``; a layer converted alike already keeps its quantizers), with
    fake quantization on, its weight scales frozen at the file's and its activation quantizers' state (ranges,
    learned steps) restored; the model's other quantized layers are switched off, as in the saved model. So
    ``model`` in eval mode computes what the saved model computed, and :func:`~litcompress.export.export_onnx`
    writes the same ONNX file from it. The file of a model with weights quantized alone (format 3, as every file of
    earlier releases) holds the dequantized weights, which compute exactly what that model computed, in a float
    model. ``with fake_quant(model, False):`` runs the loaded weights with float activations, and
    :func:`~litcompress.quantization.revert_` gives a layer its plain class back.

    Example: a W8A8 layer, saved and loaded into a fresh plain model, computes as the saved one.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.Linear(8, 4))
    >>> layer = convert_(model, QuantConfig(), ["0"])["0"]
    >>> layer.fake_quant_enabled = True
    >>> _ = model.train()(torch.randn(16, 8))  # observes the input's range...
    >>> layer.input_quantizers["input"].commit()  # ...which the QAT callback commits after each step
    >>> path = save_compressed(model.eval(), "doctest_w8a8.safetensors")
    >>> fresh = load_compressed(nn.Sequential(nn.Linear(8, 4)), path).eval()
    >>> type(fresh[0]).__name__, fresh[0].fake_quant_enabled
    ('QATLinear', True)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(fresh(x), model(x))
    True
    >>> path.unlink()

    Raises:
        TypeError: ``model`` is not a module, or ``path`` not a path.
        ValueError: the file is missing, truncated, damaged (its checksum differs), not a safetensors file, not
            written by :func:`save_compressed`, inconsistent (a layout field, a tensor's dtype or length, a scale
            that is not finite and positive, positions of nonzeros that :func:`save_compressed` never writes, an
            alias of an unknown or aliased name, a quantized layer's record), or written for a model with other
            tensor names, shapes (every tensor whose shape differs is named, with both shapes), dtypes or layers.
            ``model`` is then left as it was.
    """
    require("safetensors", what="load_compressed")
    from safetensors import safe_open

    if isinstance(model, (str, os.PathLike)) and isinstance(path, nn.Module):
        fail("model", "a torch.nn.Module (the model comes first)", str(model), exc=TypeError,
             hint="call load_compressed(model, path), as save_compressed(model, path)")
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    if not isinstance(path, (str, os.PathLike)):
        fail("path", "a str or os.PathLike", type(path).__name__, exc=TypeError)
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a Mapping)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        bad_file(path, f"reading it failed: {err}")
    # everything is checked, and every tensor decoded, before anything is written into the model
    version, text, records_text = _read_metadata(metadata, stored, path)
    layout = parse_layout(text, version, path)
    records = _deployed.parse(records_text, layout, path)
    state = model.state_dict()
    _check_names_and_shapes(layout, state, type(model).__name__)
    check_model(layout, state, type(model).__name__)
    _deployed.check_layers(model, records)
    expected = {f"{name}:{kind}" for name, entry in layout.items() for kind in _parts(entry)}
    if set(stored) != expected:
        missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
        bad_file(path, "; ".join([f"its layout names tensors it lacks: {missing[:5]}"] * bool(missing)
                                 + [f"it holds tensors its layout does not describe: {extra[:5]}"] * bool(extra)))
    restored = {name: _decode(name, entry, stored, version, path).to(state[name].dtype)
                for name, entry in layout.items() if entry.alias is None}
    aliases = {name: entry.alias for name, entry in layout.items() if entry.alias is not None}
    for name, target in aliases.items():
        restored[name] = restored[target]
    undo = _deployed.convert(model, records, layout)  # checked as it goes: undone, and raises, on a mismatch
    try:
        model.load_state_dict(restored, strict=True)
    except Exception:
        undo()
        raise
    _tie(model, aliases)
    _deployed.restore(model, records, {name: stored[f"{name}:scale"] for rec in records.values()
                                       for name in rec.weights.values()})
    return model


def _read_metadata(metadata: dict[str, str], stored: dict[str, Tensor], path: Path) -> tuple[int, str, str]:
    """The format version, the layout and (format 4) the quantized layers' record, after the checksum is verified."""
    fmt = metadata.get("format")
    if fmt != _deployed.FORMAT:
        if fmt not in READABLE:
            fail("path", f"a file written by save_compressed (format {_deployed.FORMAT!r} or earlier)", str(path),
                 hint=f"its metadata says format={fmt!r}")
        return (*read_metadata(metadata, stored, path), "{}")
    text, records = metadata.get("layout"), metadata.get(_deployed.KEY)
    if text is None:
        bad_file(path, "its metadata has no layout")
    if records is None:
        bad_file(path, f"its metadata has no {_deployed.KEY!r}, which every file of format {fmt!r} holds")
    expected = metadata.get("sha256")
    if expected is None:
        bad_file(path, f"its metadata has no checksum, which every file of format {fmt!r} holds")
    if expected != checksum(fmt, json.dumps([text, records]), stored):
        bad_file(path, "its checksum does not match its contents (the file is damaged or was edited)")
    return 4, text, records


def _check_names_and_shapes(layout: dict[str, Entry], state: dict[str, Any], model_name: str) -> None:
    """The file's tensors are the model's, of the same shapes: else one error naming every difference (tensors only
    in the model, only in the file, and each tensor whose shape differs, with the file's and the model's shapes)."""
    missing, extra = sorted(set(state) - set(layout)), sorted(set(layout) - set(state))
    shapes = [f"`{name}` {list(entry.shape)} vs {list(state[name].shape)}" for name, entry in layout.items()
              if isinstance(state.get(name), Tensor) and entry.shape != tuple(state[name].shape)]
    if not (missing or extra or shapes):
        return

    def more(items: list[str]) -> str:
        return f" and {len(items) - 8} more" if len(items) > 8 else ""

    hint = "; ".join([f"shapes differ (file vs model): {', '.join(shapes[:8])}{more(shapes)}"] * bool(shapes)
                     + [f"missing from the file: {missing[:8]}{more(missing)}"] * bool(missing)
                     + [f"not in the model: {extra[:8]}{more(extra)}"] * bool(extra))
    fail("model", "a model with the tensors stored in the file, of the same shapes", model_name, hint=hint)


def _parts(entry: Entry) -> list[str]:
    """The tensors the file holds for ``entry``: none for an alias."""
    if entry.alias is not None:
        return []
    positions = [] if entry.positions is None else [entry.positions]  # "mask", "gaps" or "runs"
    return ["values", *positions] + ["scale"] * (entry.bits is not None)


def _decode(name: str, entry: Entry, stored: dict[str, Tensor], version: int, path: Path) -> Tensor:
    """The tensor ``name`` as the file stores it, every part checked against ``entry`` (its layout)."""

    def bad(hint: str) -> NoReturn:
        bad_file(path, f"`{name}` {hint}")

    def part(kind: str, dtype: torch.dtype, numel: int) -> Tensor:
        t = stored[f"{name}:{kind}"]
        if t.dtype != dtype or t.shape != (numel,):
            bad(f"has {kind} of {t.dtype} and shape {tuple(t.shape)}, where its layout means {dtype} and ({numel},)")
        return t

    n = count = entry.numel
    kind = entry.positions
    if kind is not None:
        data = part(kind, torch.uint8, _positions.nbytes(kind, entry.width, entry.codes, n))
        try:
            mask = _positions.decode(kind, entry.width, entry.codes, data, n)
        except _positions.BadPositions as err:
            bad(str(err))
        count = int(mask.sum())
    if entry.bits is None:
        values = part("values", entry.dtype, count)
    elif entry.count is not None:
        if entry.count != count:
            bad(f"has count={entry.count} in its layout, where its {kind or 'shape'} means {count}")
        packed = part("values", torch.uint8, -(-count // 2))
        if count % 2 and packed[-1] >> 4:
            bad("has a nonzero padding half-byte after its last 4-bit value")
        values = _unpack_int4(packed, count)
    else:
        values = part("values", torch.int8, count)
    if entry.bits is not None:
        qmax = 2 ** (entry.bits - 1) - 1
        if ((values < -qmax) | (values > qmax)).any():
            bad(f"has integer values outside [-{qmax}, {qmax}], the range of {entry.bits} bits")
    if kind is not None:
        if (values == 0).any():
            bad(f"has a zero among its nonzero values (placed by its {kind})")
        full = torch.zeros(n, dtype=values.dtype)
        full[mask] = values
        values = full
    values = values.reshape(entry.shape)
    if entry.bits is None:
        return values
    scale = stored[f"{name}:scale"]
    axis = entry.axis if version > 1 else (0 if scale.dim() else None)  # format 1: per-channel along axis 0
    if axis is not None and axis >= len(entry.shape):
        bad(f"has per-channel scales, yet its shape {list(entry.shape)} has no axis {axis}")
    want = () if axis is None else (entry.shape[axis],)
    if scale.dtype != torch.float32 or scale.shape != want:
        bad(f"has scales of {scale.dtype} and shape {tuple(scale.shape)}, where its layout (axis={entry.axis}) "
            f"means float32 and {want}")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        bad("has a scale that is not a finite positive number")
    return values.float() * _scale_shape(scale, len(entry.shape), axis or 0)


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each aliased parameter the very tensor it aliases (a model built untied is tied as the file says)."""
    for name, target in aliases.items():
        owner, _, attr = name.rpartition(".")
        try:
            module, shared = model.get_submodule(owner), model.get_parameter(target)
        except AttributeError:  # not parameters (buffers, or keys a custom state_dict made): values are loaded
            continue
        if attr in dict(module.named_parameters(recurse=False)) and getattr(module, attr) is not shared:
            setattr(module, attr, shared)
