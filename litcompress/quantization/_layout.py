"""What a compact file says, checked before anything of it reaches a model (private: for ``compact.py``).

A file is read in this order: its metadata (format tag, checksum), its layout (JSON, field by field, then the aliases
between entries), the layout against the model (names, shapes, dtypes), and the tensors against the layout (in
``compact.py``, as they are decoded). Every problem is a ``ValueError`` that names the file and the tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from litcompress._validation import fail
from litcompress.quantization._positions import MAX_WIDTH

FORMAT = "litcompress.compact/3"
# version 1: no aliases, per-channel scales along axis 0; versions 1 and 2: positions of sparse tensors as a mask only
READABLE = {"litcompress.compact/1": 1, "litcompress.compact/2": 2, FORMAT: 3}
DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_FIELDS = ("shape", "dtype", "alias", "bits", "axis", "count", "sparse", "gaps", "runs", "codes")


@dataclass(frozen=True)
class Entry:
    """One key of the model's ``state_dict`` as the file stores it (see the module docstring of ``compact.py``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    alias: str | None = None
    bits: int | None = None
    axis: int | None = None
    count: int | None = None
    positions: str | None = None  # sparse: "mask", "gaps" or "runs" (see ``_positions.py``); None: dense
    width: int = 1  # bits of one gap or run code
    codes: int = 0  # gap or run codes stored

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def bad_file(path: Path, hint: str) -> NoReturn:
    fail("path", "a complete safetensors file written by save_compressed", str(path), hint=hint)


def checksum(fmt: str, layout: str, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the format tag, the layout and every tensor (name, dtype, shape, bytes): damage anywhere shows."""
    names = sorted(tensors)
    digest = hashlib.sha256(json.dumps(
        [fmt, layout, [(k, str(tensors[k].dtype), list(tensors[k].shape)) for k in names]]).encode())
    for k in names:
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def read_metadata(metadata: Mapping[str, str], stored: Mapping[str, Tensor], path: Path) -> tuple[int, str]:
    """The format version and the layout text of a file, after its checksum (when it has one) is verified."""
    fmt = metadata.get("format")
    if fmt not in READABLE:
        fail("path", f"a file written by save_compressed (format {FORMAT!r})", str(path),
              hint=f"its metadata says format={fmt!r}")
    layout = metadata.get("layout")
    if layout is None:
        bad_file(path, "its metadata has no layout")
    expected = metadata.get("sha256")
    if expected is not None and expected != checksum(fmt, layout, stored):
        bad_file(path, "its checksum does not match its contents (the file is damaged or was edited)")
    return READABLE[fmt], layout


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


def parse_layout(text: str, version: int, path: Path) -> dict[str, Entry]:
    """The entries of a layout, each field checked (names, types, ranges) and every alias resolved."""
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        bad_file(path, f"its layout is not valid JSON ({err})")
    if not isinstance(raw, dict):
        bad_file(path, f"its layout is a JSON {type(raw).__name__}, not an object of tensor names")
    entries = {name: _entry(name, value, version, path) for name, value in raw.items()}
    for name, entry in entries.items():
        if entry.alias is None:
            continue
        target = entries.get(entry.alias)
        if target is None:
            bad_file(path, f"`{name}` is an alias of `{entry.alias}`, which the file does not hold")
        if target.alias is not None:  # also an alias of itself, and every cycle
            bad_file(path, f"`{name}` is an alias of `{entry.alias}`, itself an alias (of `{target.alias}`)")
        if (target.shape, target.dtype) != (entry.shape, entry.dtype):
            bad_file(path, f"`{name}` ({list(entry.shape)}, {entry.dtype}) is an alias of `{entry.alias}` "
                           f"({list(target.shape)}, {target.dtype}): a tied tensor has one shape and dtype")
    return entries


def _entry(name: str, value: Any, version: int, path: Path) -> Entry:
    def bad(hint: str) -> NoReturn:
        bad_file(path, f"in its layout, `{name}` {hint}")

    if not isinstance(value, dict):
        bad(f"is a JSON {type(value).__name__}, not an object")
    unknown = [k for k in value if k not in _FIELDS]
    if unknown:
        bad(f"has unexpected fields {unknown}")
    for field in ("shape", "dtype"):
        if field not in value:
            bad(f"has no {field!r}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(_int(s) and s >= 0 for s in shape):
        bad(f"has shape {shape!r}, not a list of non-negative ints")
    dtype = DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        bad(f"has dtype {value['dtype']!r}, not the name of a torch dtype")
    if "alias" in value:
        others = sorted(set(value) - {"shape", "dtype", "alias"})
        if version < 2:
            bad("is an alias, which files of format 1 never hold")
        if others:
            bad(f"is an alias, yet has the fields {others} of a stored tensor")
        if not isinstance(value["alias"], str):
            bad(f"is an alias of {value['alias']!r}, not of a tensor name")
        return Entry(tuple(shape), dtype, alias=value["alias"])
    bits: Any = value.get("bits")
    if "bits" in value and not (_int(bits) and 2 <= bits <= 8):
        bad(f"has bits={bits!r}, not an int in [2, 8]")
    if bits is not None and not dtype.is_floating_point:
        bad(f"is quantized, yet of dtype {dtype}: only floating-point weights are")
    count: Any = value.get("count")
    if "count" in value and not (bits is not None and bits <= 4):
        bad(f"has a count, which only weights of 4 bits or fewer have (bits={bits!r})")
    if bits is not None and bits <= 4 and not (_int(count) and count >= 0):
        bad(f"has count={count!r}, not the int number of its 4-bit values")
    axis: Any = value.get("axis")
    if "axis" in value:
        if version < 2 or bits is None:
            bad("has an axis, which only per-channel quantized weights of format 2 or later have")
        if not (_int(axis) and 0 <= axis < len(shape)):
            bad(f"has axis={axis!r}, not a dimension of its shape {shape}")
    positions, width, codes = _sparse_fields(value, version, bad)
    return Entry(tuple(shape), dtype, bits=bits, axis=axis, count=count, positions=positions, width=width,
                 codes=codes)


def _sparse_fields(value: dict[str, Any], version: int, bad: Callable[[str], NoReturn]) -> tuple[str | None, int, int]:
    """How a stored tensor's layout says its nonzeros are placed: ``(kind or None when dense, width, codes)``."""
    kinds = [k for k in ("sparse", "gaps", "runs") if k in value]
    if len(kinds) > 1:
        bad(f"has the fields {kinds}, where a sparse tensor has one of them (its positions are in one encoding)")
    if "sparse" in value and value["sparse"] is not True:
        bad(f"has sparse={value['sparse']!r}; it is true or absent")
    kind = kinds[0] if kinds else None
    if kind in ("gaps", "runs"):
        width: Any = value[kind]
        codes: Any = value.get("codes")
        if version < 3:
            bad(f"has {kind}, which files of format {version} never hold (their positions are masks)")
        if not (_int(width) and 1 <= width <= MAX_WIDTH):
            bad(f"has {kind}={width!r}, not an int in [1, {MAX_WIDTH}] (the bits of one code)")
        if not (_int(codes) and codes >= 0):
            bad(f"has codes={codes!r}, not the int number of its {kind} codes")
        return kind, width, codes
    if "codes" in value:
        bad("has codes, which only tensors stored with gaps or runs have")
    return ("mask" if kind else None), 1, 0


def check_model(entries: Mapping[str, Entry], state: Mapping[str, Any], model_name: str) -> None:
    """The file holds exactly the model's tensors, of its shapes and of its dtypes (any float for a float)."""
    if set(entries) != set(state):
        missing, extra = sorted(set(state) - set(entries)), sorted(set(entries) - set(state))
        fail("model", "a model with the tensors stored in the file", model_name,
              hint=f"missing from the file: {missing[:5]}; not in the model: {extra[:5]}")
    for name, entry in entries.items():
        actual = state[name]
        if not isinstance(actual, Tensor):
            fail("model", f"a model whose `{name}` is a tensor, as in the file", type(actual).__name__)
        if entry.shape != tuple(actual.shape):
            fail("model", f"`{name}` of shape {entry.shape}", tuple(actual.shape))
        if entry.dtype != actual.dtype and not (entry.dtype.is_floating_point and actual.dtype.is_floating_point):
            fail("model", f"`{name}` of dtype {entry.dtype}, as in the file", actual.dtype,
                  hint="only floating-point tensors are converted to the model's dtype")
