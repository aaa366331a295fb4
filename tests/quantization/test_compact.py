"""Compact files of sparse tensors: every positions encoding round-trips bit for bit through a file, each tensor is
stored in its smallest form, files of format 2 (bitmasks) still load, and LeNet-300-100 pruned as Han et al. did is
measured against its fp32 file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from litcompress.quantization import QuantConfig, _positions, convert_, fake_quant
from litcompress.quantization._layout import checksum
from litcompress.quantization.compact import load_compressed, save_compressed


def _same(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal dtype and values, NaN where NaN was (-0.0 equals 0.0: pruned weights are zeros, whatever their sign)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=name)


def _edge_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scattered = torch.randn(100, 200, generator=g) * (torch.rand(100, 200, generator=g) < 0.08)
    rows = torch.randn(30, 40, generator=g)
    rows[torch.arange(30) % 4 != 0] = 0  # whole rows
    special = torch.zeros(64)
    special[[3, 40, 41]] = torch.tensor([-0.0, float("nan"), float("-inf")])  # -0.0 is a zero; NaN and inf are not
    return {
        "all_zeros": torch.zeros(5, 7),
        "all_nonzero": torch.randn(5, 7, generator=g),
        "last_only": torch.zeros(1000).index_fill_(0, torch.tensor([999]), 2.5),
        "long_gaps": torch.zeros(100_000).index_fill_(0, torch.tensor([0, 70_000, 99_999]), 1.0),
        "scattered": scattered,
        "rows": rows,
        "one_zero": torch.zeros(1),
        "one_nonzero": torch.ones(1),
        "scalar_zero": torch.tensor(0.0),
        "special": special,
        "fp16": scattered[:10].half(),
        "halfdense": torch.randn(400, generator=g) * (torch.rand(400, generator=g) < 0.5),
        "flags": torch.rand(300, generator=g) < 0.05,
        "counts": (torch.rand(300, generator=g) < 0.05).long() * 7,
    }


class Holder(nn.Module):
    """Buffers of every edge case, plus quantized layers: int8 (`q8`) and 4-bit with an odd count of nonzeros (`q4`)."""

    def __init__(self) -> None:
        super().__init__()
        for name, value in _edge_tensors().items():
            self.register_buffer(name, value)
        self.q8 = nn.Linear(64, 32)
        self.q4 = nn.Linear(64, 33, bias=False)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            self.q8.weight.mul_(torch.rand(32, 64, generator=g) < 0.1)
            ints = torch.randint(-7, 8, (33, 64), generator=g) * (torch.rand(33, 64, generator=g) < 0.1)
            ints[:, 0] = 7  # every row's scale is 0.7 / 7: these integers are what the file stores
            if int((ints != 0).sum()) % 2 == 0:  # an odd count of 4-bit values: a padding half-byte
                ints[1, 1] = 3 if ints[1, 1] == 0 else 0
            self.q4.weight.copy_(ints * 0.1)
        convert_(self, QuantConfig(activation_bits=None), ["q8"])
        convert_(self, QuantConfig(weight_bits=4, activation_bits=None), ["q4"])


def _saved(model: nn.Module, path) -> tuple[dict, dict]:
    with fake_quant(model, True):
        save_compressed(model, path)
    with safe_open(str(path), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
    return layout, load_file(str(path))


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """What loading must give back: buffers as they are, quantized weights as training saw them (fake-quantized)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with fake_quant(model, True):
        for name in ("q8", "q4"):
            layer = model.get_submodule(name)
            state[f"{name}.weight"] = layer.weight_quantizers["weight"](layer.weight).detach()
    return state


@pytest.mark.parametrize("kinds", [("mask",), ("gaps",), ("runs",), _positions.KINDS])
def test_every_encoding_round_trips_bit_for_bit(tmp_path, monkeypatch, kinds):
    monkeypatch.setattr(_positions, "KINDS", kinds)
    model = Holder()
    layout, _ = _saved(model, tmp_path / "f.safetensors")
    used = {k for entry in layout.values() for k in ("sparse", "gaps", "runs") if k in entry}
    assert used == ({"sparse"} if kinds == ("mask",) else set(kinds) if len(kinds) == 1 else {"sparse", "gaps", "runs"})
    assert layout["q4.weight"]["count"] % 2 == 1 and layout["all_nonzero"].keys() == {"shape", "dtype"}
    fresh = Holder()
    load_compressed(fresh, tmp_path / "f.safetensors")
    state = fresh.state_dict()
    for name, value in _expected(model).items():
        _same(state[name], value, name)


def test_the_default_choice_uses_every_encoding_and_long_gaps(tmp_path):
    layout, _ = _saved(Holder(), tmp_path / "f.safetensors")
    assert "runs" in layout["rows"] and "gaps" in layout["fp16"] and "sparse" in layout["halfdense"], layout
    scattered = layout["scattered"]  # 8% of 20,000: 5-bit gaps, and the gaps over 30 zeros cut by escapes
    assert scattered["gaps"] == 5 and scattered["codes"] > int((Holder().scattered != 0).sum()), scattered
    long_gaps = layout["long_gaps"]  # gaps of 69,999 and 29,998 zeros
    assert "gaps" in long_gaps and long_gaps["codes"] == 3  # 17-bit gaps: no escape beats escapes
    assert layout["all_zeros"]["codes"] == 0 and layout["scalar_zero"]["codes"] == 0  # no values, no positions
    assert layout["one_nonzero"].keys() == {"shape", "dtype"}  # dense: one value, no positions


def test_each_tensor_is_stored_in_its_smallest_form(tmp_path):
    """For every tensor: positions in the smallest of every encoding (each one written out), and sparse only when
    positions plus nonzero values take fewer bytes than the dense values."""
    model = Holder()
    layout, tensors = _saved(model, tmp_path / "f.safetensors")
    with fake_quant(model, True):
        ints = {f"{name}.weight": model.get_submodule(name).weight_quantizers["weight"].integers(
            model.get_submodule(name).weight)[0] for name in ("q8", "q4")}
    state = {**model.state_dict(), **ints}
    checked = 0
    for name, entry in layout.items():
        flat = state[name].reshape(-1)
        nonzero = flat != 0
        real = {(kind, width): len(_positions.encode(nonzero, kind, width)[0]) for kind in _positions.KINDS
                for width in ([1] if kind == "mask" else range(1, _positions.MAX_WIDTH + 1))}
        per = 0.5 if entry.get("bits", 8) <= 4 else flat.element_size()
        dense = math.ceil(flat.numel() * per)
        sparse = min(real.values()) + math.ceil(int(nonzero.sum()) * per)
        kind = next((k for k in ("sparse", "gaps", "runs") if k in entry), None)
        if kind is None:
            assert flat.numel() == 0 or dense <= sparse, (name, dense, sparse)
            continue
        stored = tensors[f"{name}:{'mask' if kind == 'sparse' else kind}"]
        assert len(stored) == min(real.values()) and sparse < dense, (name, len(stored), min(real.values()))
        checked += 1
    assert checked >= 10


def test_files_of_format_2_still_load(tmp_path, monkeypatch):
    """A format-2 file: bitmasks only, the layout JSON with spaces (as the code before format 3 wrote it)."""
    monkeypatch.setattr(_positions, "KINDS", ("mask",))
    model = Holder()
    layout, tensors = _saved(model, tmp_path / "f.safetensors")
    text = json.dumps(layout)
    fmt = "litcompress.compact/2"
    save_file(tensors, str(tmp_path / "v2.safetensors"),
              metadata={"format": fmt, "layout": text, "sha256": checksum(fmt, text, tensors)})
    state = load_compressed(Holder(), tmp_path / "v2.safetensors").state_dict()
    for name, value in _expected(model).items():
        _same(state[name], value, name)


# ------------------------------------------------------------------------------- LeNet-300-100, Han et al. 2015
HAN_KEPT = {"net.0": 0.08, "net.2": 0.09, "net.4": 0.26}  # fc1 / fc2 / fc3 (Han et al. 2015, Table 1)


def lenet_300_100(bits: int, seed: int = 0) -> nn.Module:
    """LeNet-300-100 with random weights, each layer's largest-magnitude fraction kept, converted for QAT."""
    torch.manual_seed(seed)
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        for name, kept in HAN_KEPT.items():
            w = model.get_submodule(name).weight
            top = w.abs().reshape(-1).topk(round(kept * w.numel())).indices
            w.copy_(torch.zeros_like(w).reshape(-1).index_copy_(0, top, w.reshape(-1)[top]).reshape(w.shape))
    convert_(model, QuantConfig(weight_bits=bits, activation_bits=None), list(HAN_KEPT))
    return model


def fp32_bytes(model: nn.Module, path) -> int:
    """The fp32 state_dict as a safetensors file (as `summarize` and the benchmarks measure it)."""
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


@pytest.mark.parametrize(("bits", "least", "bitmask_ratio"), [(4, 35.0, 21.7), (8, 25.8, 17.8)])
def test_lenet_300_100_at_han_fractions(tmp_path, monkeypatch, bits, least, bitmask_ratio):
    """Measured: 35.1x (4 bits) and 25.9x (8 bits) smaller than fp32; bitmasks gave 21.7x and 17.8x.

    Deep Compression's 40x is out of reach here without an entropy coder: with random weights the kept positions
    are random, so no exact encoding of them takes fewer than log2 C(n, k) bits per layer, and even that bound
    leaves the file above fp32 / 40 (the test checks this, from the file's own parts).
    """
    model = lenet_300_100(bits)
    fp32 = fp32_bytes(model, tmp_path / "fp32.safetensors")
    layout, tensors = _saved(model, tmp_path / "c.safetensors")
    size = (tmp_path / "c.safetensors").stat().st_size
    assert all("gaps" in layout[f"{name}.weight"] for name in HAN_KEPT), layout
    assert fp32 / size >= least, (fp32, size, fp32 / size)
    monkeypatch.setattr(_positions, "KINDS", ("mask",))
    _saved(model, tmp_path / "mask.safetensors")
    assert fp32 / (tmp_path / "mask.safetensors").stat().st_size == pytest.approx(bitmask_ratio, abs=0.1)

    positions = sum(len(tensors[f"{name}.weight:gaps"]) for name in HAN_KEPT)
    bound = 0.0
    for name in HAN_KEPT:
        entry = layout[f"{name}.weight"]
        n, k = math.prod(entry["shape"]), entry.get("count", len(tensors[f"{name}.weight:values"]))  # 4 bits: count
        bound += (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / 8
    assert positions < 1.08 * bound, (positions, bound)  # fixed-width gaps: within 8% of the bound
    assert fp32 / (size - positions + bound) < 40, "an exact position encoding could now reach 40x"
