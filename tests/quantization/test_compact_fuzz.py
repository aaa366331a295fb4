"""A damaged or crafted compact file is a `ValueError` naming the file (or the model), and the model is left exactly as
it was; a corruption that leaves the file valid (a no-op) loads the same weights as the intact file.

The fuzz test is deterministic (seeded): it corrupts the layout (fields deleted, added, retyped, changed; entries
swapped, renamed, aliased in a cycle), the layout's JSON text, the metadata, the tensors (truncated, extended,
retyped, reshaped, a NaN/inf/zero scale, integers out of range, positions that end in an escape) and the file's raw
bytes. Targeted tests follow for each check of the positions of sparse tensors (mask, gaps, runs).
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from litcompress.quantization import QuantConfig, convert_, fake_quant
from litcompress.quantization._layout import DTYPES, FORMAT, checksum
from litcompress.quantization.compact import load_compressed, save_compressed

CORRUPTIONS = 600


class Net(nn.Module):
    """Every kind of entry a compact file holds: int8 per-channel and sparse (`fc1`, positions as gaps), 4-bit
    per-channel (`emb`), 3-bit per-tensor, sparse (a mask), with an odd count (`fc2`), a tied alias (`head`), float,
    int64 and bool buffers, sparse ones with no values, one whose nonzeros are one run (`rows`). No two distinct
    entries share a shape, so renaming or retargeting one cannot give a valid file."""

    def __init__(self, seed: int, tied: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 5, bias=False)
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight if tied else nn.Parameter(torch.randn(11, 6))
        self.register_buffer("keep", torch.rand(13) > 0.6)
        self.register_buffer("rows", torch.randn(4, 10))


def _source() -> Net:
    model = Net(0)
    with torch.no_grad():
        model.fc1.weight.mul_(torch.rand(10, 6) > 0.8)  # pruned: stored sparse
        ints = torch.randint(1, 4, (50,)) * (torch.randint(0, 2, (50,)) * 2 - 1)
        ints[torch.randperm(50)[:25]] = 0  # 25 nonzero 3-bit values: an odd count, so a padding half-byte
        ints[ints.nonzero()[0]] = 3
        model.fc2.weight.copy_(ints.view(5, 10) * 0.1)  # on the 3-bit grid: exactly these integers are stored
        model.norm.running_var.uniform_(0.5, 2.0)
        model.rows[[0, 2, 3]] = 0  # one row of nonzeros: two runs
    convert_(model, QuantConfig(activation_bits=None), ["fc1"])
    convert_(model, QuantConfig(weight_bits=4, activation_bits=None), ["emb"])
    convert_(model, QuantConfig(weight_bits=3, weight_granularity="per_tensor", activation_bits=None), ["fc2"])
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The intact file, what it holds, and the weights it loads into a fresh (untied) model."""
    model = _source()
    path = tmp_path_factory.mktemp("compact") / "intact.safetensors"
    with fake_quant(model, True):
        save_compressed(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    layout = json.loads(metadata["layout"])
    assert {"gaps", "codes", "bits", "axis"} <= set(layout["fc1.weight"])  # int8, sparse: gaps
    assert layout["head.weight"]["alias"] == "emb.weight"
    assert layout["fc2.weight"]["count"] == 25 and "axis" not in layout["fc2.weight"]  # 3 bits, per tensor
    assert layout["fc2.weight"]["sparse"] and "count" in layout["emb.weight"] and "axis" in layout["emb.weight"]
    assert layout["keep"]["sparse"] and layout["norm.running_mean"]["codes"] == 0  # bools; no values: no codes
    assert layout["rows"]["runs"] == 4 and layout["rows"]["codes"] == 2  # 10 zeros, 10 nonzeros
    fresh = load_compressed(Net(1, tied=False), path)
    return path, load_file(str(path)), layout, {k: v.clone() for k, v in fresh.state_dict().items()}


def _write(path, tensors, layout, fmt=FORMAT, sha=True, **extra):
    """A file as save_compressed would write it (the checksum recomputed: a crafted file, not a damaged one)."""
    text = layout if isinstance(layout, str) else json.dumps(layout)
    metadata = {k: v for k, v in {"format": fmt, "layout": None if layout is None else text}.items() if v is not None}
    metadata.update(extra)
    if sha:
        metadata["sha256"] = checksum(fmt, text, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _load(path, reference) -> str:
    """'rejected' (a ValueError; the model unchanged) or 'loaded' (the intact file's weights, tied again)."""
    model = Net(2, tied=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_compressed(model, path)
    except ValueError as err:
        assert str(err).startswith(("Expected argument `path`", "Expected argument `model`")), err
        assert model.head.weight is not model.emb.weight
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), "the model changed before the error"
        return "rejected"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items()), "loaded other weights than the file holds"
    assert model.head.weight is model.emb.weight
    return "loaded"


# ------------------------------------------------------------------------------------------------ corruptions
JUNK = ["x", "", "float32", "emb.weight", "head.weight", 1.5, -1, 0, 3, 10**20, None, True, False, [], [1, "a"], {},
        {"shape": [5]}, float("nan")]


def _changed(rng: random.Random, value, names):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value - 1, 0, 2, 9, 2**40])
    if isinstance(value, list):
        i = rng.randrange(len(value)) if value else 0
        return rng.choice([value[:-1], [*value, 1], value[::-1], [*value[:i], value[i] + 1, *value[i + 1:]]
                           if value else [0]])
    if isinstance(value, str):
        return rng.choice([*rng.sample(sorted(DTYPES), 3), *names, value + "x", value.upper()])
    return rng.choice(JUNK)


def corrupt_layout(rng, tensors, layout):
    layout = json.loads(json.dumps(layout))
    names = list(layout)
    name = rng.choice(names)
    entry = layout[name]
    field = rng.choice(sorted(entry))
    kind = rng.choice(["delete-field", "add-field", "retype-field", "change-field", "change-field", "swap",
                       "delete-entry", "add-entry", "rename-entry", "alias", "not-an-object"])
    if kind == "delete-field":
        del entry[field]
    elif kind == "add-field":
        entry[rng.choice(["bits", "axis", "count", "sparse", "gaps", "runs", "codes", "alias", "scale", "Shape"])] = \
            rng.choice(JUNK)
    elif kind == "retype-field":
        entry[field] = rng.choice([v for v in JUNK if type(v) is not type(entry[field])])
    elif kind == "change-field":
        entry[field] = _changed(rng, entry[field], names)
    elif kind == "swap":
        other = rng.choice(names)
        layout[name], layout[other] = layout[other], entry
    elif kind == "delete-entry":
        del layout[name]
    elif kind == "add-entry":
        layout[rng.choice(["ghost", "fc3.weight", ""])] = entry
    elif kind == "rename-entry":
        layout[name + rng.choice(["_", ".x", "0"])] = layout.pop(name)
    elif kind == "alias":  # a cycle, an alias of itself, of an unknown name, of another shape
        target = rng.choice(["head.weight", name, "nope", "fc1.weight"])
        layout[name] = {"shape": entry["shape"], "dtype": entry["dtype"], "alias": target}
    else:
        layout = rng.choice([[layout], 3, "layout", None, list(layout)])
    return kind + (f" {name}.{field}" if "field" in kind else f" {name}"), tensors, layout


def corrupt_text(rng, tensors, layout):
    text = json.dumps(layout)
    i = rng.randrange(len(text))
    kind = rng.choice(["truncate", "insert", "replace", "duplicate-key", "nan", "deep", "empty"])
    if kind == "truncate":
        text = text[:i]
    elif kind == "insert":
        text = text[:i] + rng.choice('{}[]",:0123456789-. aeltrux') + text[i:]
    elif kind == "replace":
        text = text[:i] + rng.choice('{}[]",:0123456789-. aeltrux') + text[i + 1:]
    elif kind == "duplicate-key":
        first = next(iter(layout))
        text = "{" + json.dumps(first) + ": " + json.dumps(layout[first]) + ", " + text[1:]
    elif kind == "nan":
        text = text.replace("[11, 6]", rng.choice(["[NaN, 6]", "[Infinity, 6]", "[11.0, 6]", "[1e400, 6]"]), 1)
    elif kind == "deep":
        text = "[" * 100_000 + "]" * 100_000
    else:
        text = ""
    return f"text-{kind} at {i}", tensors, text


def corrupt_tensor(rng, tensors, layout):
    tensors = {k: v.clone() for k, v in tensors.items()}
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    kind = rng.choice(["truncate", "extend", "dtype", "reshape", "delete", "extra", "rename", "value", "value"])
    if kind == "truncate" and t.numel():
        tensors[key] = t.reshape(-1)[:-1]
    elif kind in ("truncate", "extend"):
        tensors[key] = torch.cat([t.reshape(-1), t.new_zeros(1)])
    elif kind == "dtype":
        tensors[key] = t.to(rng.choice([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8,
                                        torch.uint8, torch.int32, torch.int64, torch.bool]))
    elif kind == "reshape":
        tensors[key] = t.unsqueeze(rng.randrange(t.dim() + 1))
    elif kind == "delete":
        del tensors[key]
    elif kind == "extra":
        tensors[rng.choice(["junk:values", "fc1.bias:scale", "fc1.bias:mask", "norm.running_var:mask", "fc1.bias:gaps",
                            "rows:mask"])] = t.clone()
    elif kind == "rename":
        tensors[key.replace(":", rng.choice(["::", ":v", "."]))] = tensors.pop(key)
    elif t.numel():  # a value no valid file holds
        flat = tensors[key].view(-1)
        i = rng.randrange(flat.numel())
        if key.endswith(":scale"):
            flat[i] = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0])
        elif key.endswith(":mask"):
            flat[i] ^= 1 << rng.randrange(8)
        elif key.endswith((":gaps", ":runs")):  # codes of at most 8 bits: the last one an escape, or padding set
            flat[-1] = 0xFF
        elif flat.dtype == torch.int8:
            flat[i] = -128  # outside [-127, 127]
        elif flat.dtype == torch.uint8:
            flat[i] &= 0xF0  # -8: outside [-7, 7]
        elif flat.dtype == torch.bool:
            flat[i] = False  # a zero among the nonzero values of a sparse tensor
        else:
            kind = "value-none"  # a float: another valid file, left as it was
    else:
        kind = "value-none"  # no values to change
    return f"tensor-{kind} {key}", tensors, layout


def corrupt_metadata(rng, tensors, layout):
    kind = rng.choice(["no-format", "format", "format-1", "format-2", "no-layout", "sha", "no-sha", "extra-key"])
    extra: dict = {}
    fmt, sha = FORMAT, True
    if kind == "no-format":
        fmt, sha = None, False
    elif kind == "no-layout":
        layout, sha = None, False
    elif kind == "sha":
        sha, extra = False, {"sha256": rng.choice(["", "0" * 64, checksum(FORMAT, "{}", tensors)])}
    elif kind == "no-sha":
        sha = False
    elif kind == "extra-key":
        extra = {"note": "hello"}
    elif kind == "format":
        fmt = rng.choice(["litcompress.compact/4", "", "litcompress.compact/3 ", "safetensors"])
    elif kind == "format-1":
        fmt = "litcompress.compact/1"  # this file has aliases and axes, which format 1 never held
    elif kind == "format-2":
        fmt = "litcompress.compact/2"  # this file has gaps and runs, which format 2 never held
    return f"metadata-{kind}", tensors, (layout, fmt, sha, extra)


def corrupt_bytes(rng, raw: bytes):
    data = bytearray(raw)
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    kind = rng.choice(["flip-header", "flip-data", "flip", "truncate", "append", "insert", "cut", "size", "garbage"])
    i = rng.randrange(header) if kind == "flip-header" else rng.randrange(header, len(raw)) if kind == "flip-data" \
        else rng.randrange(len(raw))
    if kind.startswith("flip"):
        data[i] ^= rng.randrange(1, 256)
    elif kind == "truncate":
        del data[i:]
    elif kind == "append":
        data += rng.randbytes(rng.randrange(1, 64))
    elif kind == "insert":
        data[i:i] = rng.randbytes(rng.randrange(1, 9))
    elif kind == "cut":
        del data[i:i + rng.randrange(1, 9)]
    elif kind == "size":
        data[:8] = struct.pack("<Q", rng.choice([0, 1, header - 9, header - 7, len(raw), 2**63]))
    else:
        data = bytearray(rng.randbytes(rng.randrange(0, 256)))
    return f"bytes-{kind} at {i}", bytes(data)


# ------------------------------------------------------------------------------------------------------ tests
def test_random_corruptions_are_value_errors_and_leave_the_model_unchanged(saved, tmp_path):
    path, tensors, layout, reference = saved
    raw = path.read_bytes()
    rng = random.Random(12345)
    outcomes: dict[str, dict[str, int]] = {}
    for n in range(CORRUPTIONS):
        target = tmp_path / f"c{n}.safetensors"
        group = rng.choice(["layout", "text", "tensor", "metadata", "bytes", "bytes"])
        if group == "bytes":
            what, data = corrupt_bytes(rng, raw)
            target.write_bytes(data)
        elif group == "metadata":
            what, t, (lay, fmt, sha, extra) = corrupt_metadata(rng, tensors, layout)
            _write(target, t, lay, fmt=fmt, sha=sha, **extra)
        else:
            what, t, lay = {"layout": corrupt_layout, "text": corrupt_text, "tensor": corrupt_tensor}[group](
                rng, tensors, layout)
            _write(target, t, lay, sha=rng.random() < 0.8)  # a crafted file: with a valid checksum, or none
        try:
            outcome = _load(target, reference)
        except Exception as err:
            raise AssertionError(f"corruption {n} ({what}): {type(err).__name__}: {err}") from err
        outcomes.setdefault(group, {}).setdefault(outcome, 0)
        outcomes[group][outcome] += 1
        target.unlink()
    rejected = sum(o.get("rejected", 0) for o in outcomes.values())
    assert len(outcomes) == 5 and rejected > 0.8 * CORRUPTIONS, outcomes


def test_intact_file_and_files_without_checksum_load(saved, tmp_path):
    path, tensors, layout, reference = saved
    assert _load(path, reference) == "loaded"
    _write(tmp_path / "no-sha.safetensors", tensors, layout, sha=False)  # as written before the checksum
    assert _load(tmp_path / "no-sha.safetensors", reference) == "loaded"


def _rejected(path, match):
    model = Net(2, tied=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_compressed(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_nan_scale(saved, tmp_path):
    _, tensors, layout, _ = saved
    tensors = dict(tensors, **{"fc1.weight:scale": tensors["fc1.weight:scale"].clone()})
    tensors["fc1.weight:scale"][3] = float("nan")
    _write(tmp_path / "f.safetensors", tensors, layout)
    _rejected(tmp_path / "f.safetensors", r"`path`.*HINT: `fc1\.weight` has a scale that is not a finite positive")


def test_float64_values(saved, tmp_path):
    _, tensors, layout, _ = saved
    for key, means in [("norm.running_var:values", "torch.float32"), ("fc1.weight:values", "torch.int8"),
                       ("fc1.weight:scale", "float32")]:
        _write(tmp_path / "f.safetensors", dict(tensors, **{key: tensors[key].double()}), layout)
        name = key.partition(":")[0].replace(".", r"\.")
        _rejected(tmp_path / "f.safetensors", rf"HINT: `{name}` has \w+ of torch\.float64.*means {means}")


def test_unknown_tensor_name(saved, tmp_path):
    _, tensors, layout, _ = saved
    layout = {("fc9.bias" if k == "fc1.bias" else k): v for k, v in layout.items()}
    _write(tmp_path / "f.safetensors", tensors, layout)
    _rejected(tmp_path / "f.safetensors", r"`model` to be a model with the tensors stored.*not in the model: \['fc9")


def test_bad_json_layout(saved, tmp_path):
    _, tensors, layout, _ = saved
    _write(tmp_path / "f.safetensors", tensors, json.dumps(layout)[:-1])
    _rejected(tmp_path / "f.safetensors", r"`path` to be a complete safetensors file .* its layout is not valid JSON")


def test_alias_cycle_and_unknown_alias(saved, tmp_path):
    _, tensors, layout, _ = saved
    cycle = dict(layout, **{"emb.weight": {"shape": [11, 6], "dtype": "float32", "alias": "head.weight"}})
    _write(tmp_path / "f.safetensors", tensors, cycle)
    _rejected(tmp_path / "f.safetensors", r"`emb\.weight` is an alias of `head\.weight`, itself an alias")
    unknown = dict(layout, **{"head.weight": {"shape": [11, 6], "dtype": "float32", "alias": "lm.weight"}})
    _write(tmp_path / "f.safetensors", tensors, unknown)
    _rejected(tmp_path / "f.safetensors", r"`head\.weight` is an alias of `lm\.weight`, which the file does not")


def test_damaged_byte_fails_the_checksum(saved, tmp_path):
    path, *_ = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor: still a well-formed file
    (tmp_path / "f.safetensors").write_bytes(bytes(data))
    _rejected(tmp_path / "f.safetensors", r"HINT: its checksum does not match its contents")


def test_model_and_path_of_the_wrong_type(saved):
    path, *_ = saved
    with pytest.raises(TypeError, match=r"`model` to be a torch\.nn\.Module"):
        load_compressed(None, path)
    with pytest.raises(TypeError, match=r"`path` to be a str or os\.PathLike"):
        load_compressed(Net(2), None)


# ------------------------------------------------------------------------- positions of sparse tensors (format 3)
def _edit(entry: str, fields: dict, key: str | None = None, data: list[int] | None = None, drop=()):
    """A layout and tensor edit: fields set (None deletes one) in ``entry``, and the uint8 tensor ``key`` replaced."""

    def apply(tensors, layout):
        for field, value in fields.items():
            if value is None:
                layout[entry].pop(field)
            else:
                layout[entry][field] = value
        if key is not None:
            tensors[key] = torch.tensor(data, dtype=torch.uint8)
        for name in drop:
            del tensors[name]
        return tensors, layout

    return apply


def _zero_value(tensors, layout):
    tensors["fc1.weight:values"][0] = 0
    return tensors, layout


# `rows` is 10 zeros then 10 nonzeros (runs of 4 bits: codes 10, 10 in one byte); `fc1.weight` has 60 elements and
# 20 nonzeros (gaps of 3 bits)
POSITION_DAMAGE = {
    "escape at the end": (_edit("rows", {}, "rows:runs", [10 | 15 << 4]), r"`rows` has runs whose last code is an esc"),
    "padding bits set": (_edit("rows", {"codes": 1}, "rows:runs", [10 | 10 << 4]),
                         r"`rows` has runs bits set in the padding after its last code"),
    "gaps past the end": (_edit("fc1.weight", {"gaps": 8, "codes": 20}, "fc1.weight:gaps", [41] + [0] * 19),
                          r"`fc1\.weight` has gaps that cover 61 elements, past its 60"),
    "odd number of runs": (_edit("rows", {"codes": 1}, "rows:runs", [10]), r"`rows` has an odd number of runs \(1\)"),
    "empty run": (_edit("rows", {"codes": 4}, "rows:runs", [10 | 5 << 4, 0 | 5 << 4]), r"`rows` has an empty run"),
    "fewer nonzeros than values": (_edit("rows", {}, "rows:runs", [10 | 9 << 4]),
                                   r"`rows` has values of torch\.float32 and shape \(10,\), where its layout means "
                                   r"torch\.float32 and \(9,\)"),
    "codes and bytes disagree": (_edit("rows", {"codes": 3}),
                                 r"`rows` has runs of torch\.uint8 and shape \(1,\), where its layout means "
                                 r"torch\.uint8 and \(2,\)"),
    "width 0": (_edit("fc1.weight", {"gaps": 0}), r"`fc1\.weight` has gaps=0, not an int in \[1, 32\]"),
    "width 33": (_edit("rows", {"runs": 33}), r"`rows` has runs=33, not an int in \[1, 32\]"),
    "width true": (_edit("rows", {"runs": True}), r"`rows` has runs=True, not an int"),
    "no codes": (_edit("fc1.weight", {"codes": None}), r"`fc1\.weight` has codes=None, not the int number of its gaps"),
    "negative codes": (_edit("rows", {"codes": -2}), r"`rows` has codes=-2"),
    "two encodings": (_edit("fc1.weight", {"sparse": True}), r"`fc1\.weight` has the fields \['sparse', 'gaps'\]"),
    "codes of a mask": (_edit("fc2.weight", {"codes": 3}), r"`fc2\.weight` has codes, which only tensors stored with"),
    "runs said, gaps stored": (_edit("fc1.weight", {"gaps": None, "runs": 3}),
                               r"its layout names tensors it lacks: \['fc1\.weight:runs'\]"),
    "positions missing": (_edit("rows", {}, drop=["rows:runs"]), r"its layout names tensors it lacks: \['rows:runs'\]"),
    "a zero among the values": (_zero_value, r"`fc1\.weight` has a zero among its nonzero values \(placed by its "
                                             r"gaps\)"),
}


@pytest.mark.parametrize("case", sorted(POSITION_DAMAGE))
def test_damaged_positions(saved, tmp_path, case):
    _, tensors, layout, _ = saved
    edit, match = POSITION_DAMAGE[case]
    tensors, layout = edit({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(layout)))
    _write(tmp_path / "f.safetensors", tensors, layout)
    _rejected(tmp_path / "f.safetensors", r"`path` to be a complete safetensors file.*HINT: .*" + match)


def test_gaps_in_a_file_of_format_2(saved, tmp_path):
    _, tensors, layout, _ = saved
    _write(tmp_path / "f.safetensors", tensors, layout, fmt="litcompress.compact/2")
    _rejected(tmp_path / "f.safetensors", r"`rows` has runs, which files of format 2 never hold")
