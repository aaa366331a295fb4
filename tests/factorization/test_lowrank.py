"""Truncated-SVD factorization in pure torch: shapes, parameters, reconstruction error and outputs follow the rank."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from litcompress.factorization import Factorized, choose_rank, factorize_, may_factorize


def _low_rank_weight(out: int, inp: int, spectrum: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(spectrum), generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, len(spectrum), generator=g))
    return u @ torch.diag(torch.tensor(spectrum)) @ v.t()


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_linear_parameters_error_and_output_follow_the_rank(rank):
    torch.manual_seed(0)
    layer = nn.Linear(48, 32)
    x = torch.randn(5, 48)
    w, b = layer.weight.detach().clone(), layer.bias
    model = nn.Sequential(layer)
    result = factorize_(model, ["0"], rank=rank)["0"]
    assert isinstance(model[0], Factorized) and model[0].rank == rank
    assert result.params_after == rank * (48 + 32) and result.params_before == 48 * 32
    assert model[0].second.bias is b  # the same Parameter: optimizers keep it
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-r approximation
    assert torch.allclose(model(x), x @ best.t() + b, atol=1e-4)
    measured = float(torch.linalg.matrix_norm(w - best) / torch.linalg.matrix_norm(w))
    assert result.error == pytest.approx(measured, rel=1e-4)


def test_error_falls_as_the_rank_grows():
    torch.manual_seed(0)
    errors = []
    for rank in (1, 4, 8, 12):
        model = nn.Sequential(nn.Linear(40, 30))
        torch.manual_seed(0)
        model[0].reset_parameters()
        errors.append(factorize_(model, ["0"], rank=rank)["0"].error)
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] > 0


def test_an_exactly_low_rank_weight_is_reproduced():
    layer = nn.Linear(20, 16)
    with torch.no_grad():
        layer.weight.copy_(_low_rank_weight(16, 20, [5.0, 3.0, 1.0]))
    x = torch.randn(4, 20)
    expected = layer(x)
    model = nn.Sequential(layer)
    result = factorize_(model, ["0"], energy=1.0)["0"]
    assert result.rank == 3 and result.error < 1e-5
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.714, 1), (0.8, 2), (0.9, 2), (0.97, 2), (0.99, 3), (1.0, 3)])
def test_energy_keeps_the_smallest_rank_holding_that_fraction(energy, rank):
    s = torch.tensor([5.0, 3.0, 1.0])  # squared: 25, 9, 1 of 35: 0.714 with one, 0.971 with two
    assert choose_rank(s, energy=energy) == rank


def test_rank_ratio_is_a_fraction_of_the_full_rank():
    s = torch.arange(10, 0, -1).float()
    assert choose_rank(s, rank_ratio=0.25) == math.ceil(2.5)
    assert choose_rank(s, rank_ratio=1.0) == 10


def test_a_layer_is_kept_when_the_rank_would_not_cut_its_weights():
    model = nn.Sequential(nn.Linear(8, 8))
    weight = model[0].weight
    result = factorize_(model, ["0"], rank=4)["0"]  # 4 * 16 = 64 = 8 * 8: no gain
    assert not result.factorized and isinstance(model[0], nn.Linear) and model[0].weight is weight


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_convolutions_factorize_into_a_kernel_then_a_1x1(conv):
    torch.manual_seed(0)
    layer = conv(6, 12, 3, padding=1, stride=2)
    x = torch.randn(2, 6, *(9,) * (1 if conv is nn.Conv1d else 2))
    w = layer.weight.detach().reshape(12, -1)
    model = nn.Sequential(layer)
    result = factorize_(model, ["0"], rank=3)["0"]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :3] @ torch.diag(s[:3]) @ vh[:3]).reshape(layer.weight.shape)
    reference = conv(6, 12, 3, padding=1, stride=2)
    with torch.no_grad():
        reference.weight.copy_(best)
        reference.bias.copy_(layer.bias)
    kernel = 9 if conv is nn.Conv2d else 3
    assert result.params_after == 3 * (6 * kernel + 12)
    assert model[0].second.kernel_size == (1,) * (1 if conv is nn.Conv1d else 2)
    assert torch.allclose(model(x), reference(x), atol=1e-4)


def test_hf_conv1d_factorizes_like_a_transposed_linear():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs, weight (16, 24)
    x = torch.randn(3, 16)
    w = layer.weight.detach().t()
    model = nn.Sequential(layer)
    factorize_(model, ["0"], rank=4)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert torch.allclose(model(x), x @ best.t() + layer.bias, atol=1e-4)


@pytest.mark.parametrize(("layers", "kwargs", "exc", "match"), [
    (["0"], {}, TypeError, "exactly one of"),
    (["0"], {"rank": 2, "energy": 0.9}, ValueError, "exactly one of"),
    (["0"], {"rank": 0}, ValueError, "rank"),
    (["0"], {"rank": 9}, ValueError, "at most 8 for layer `0`"),
    (["0"], {"energy": 0.0}, ValueError, "energy"),
    (["0"], {"rank_ratio": 1.5}, ValueError, "rank_ratio"),
    (["1"], {"rank": 1}, ValueError, "ReLU"),
    (["2"], {"rank": 1}, ValueError, "grouped convolution"),
    (["nope"], {"rank": 1}, ValueError, "names of layers"),
])
def test_bad_input_is_refused_before_anything_changes(layers, kwargs, exc, match):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    before = [type(m) for m in model]
    with pytest.raises(exc, match=match):
        factorize_(model, ["0", *layers] if layers != ["0"] else layers, **kwargs)
    assert [type(m) for m in model] == before


def _layers() -> dict[str, nn.Module]:
    layers = {"linear": nn.Linear(12, 10), "conv2d": nn.Conv2d(3, 10, 3, padding=1, stride=2)}
    transformers = pytest.importorskip("transformers")
    layers["hf_conv1d"] = transformers.pytorch_utils.Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs: weight (12, 10)
    return layers


@pytest.mark.parametrize("kind", ["linear", "conv2d", "hf_conv1d"])
def test_a_factorized_layer_answers_what_the_replaced_layer_did(kind):
    """What T5 (`wo.weight.dtype`), ViT (`projection.weight.dtype`) and users read: the weight in the layer's own
    layout, equal to the rank-r product, with the bias, sizes, dtype and device of the factors."""
    torch.manual_seed(0)
    layer = _layers()[kind]
    shape, bias = tuple(layer.weight.shape), layer.bias
    x = torch.randn(2, 3, 8, 8) if kind == "conv2d" else torch.randn(5, 12)
    model = nn.Sequential(layer)
    factorize_(model, ["0"], rank=2)
    new = model[0]
    assert isinstance(new, Factorized) and tuple(new.weight.shape) == shape and new.bias is bias
    if kind == "conv2d":
        expected = torch.nn.functional.conv2d(x, new.weight, bias, stride=2, padding=1)
        assert (new.in_channels, new.out_channels, new.kernel_size) == (3, 10, (3, 3))
        with pytest.raises(AttributeError, match="in_features"):
            _ = new.in_features
    else:
        w = new.weight.t() if kind == "hf_conv1d" else new.weight
        expected = x @ w.t() + bias
        assert (new.in_features, new.out_features) == (new.nx, new.nf) == (12, 10)
        assert new.transposed is (kind == "hf_conv1d")
        with pytest.raises(AttributeError, match="out_channels"):
            _ = new.out_channels
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert int(torch.linalg.matrix_rank(new.weight.detach().reshape(shape[0], -1))) == 2
    model.double()
    assert new.weight.dtype == torch.float64 and new.weight.device == new.first.weight.device


def test_the_weight_is_read_only_and_no_parameter():
    """Parameter lists, state_dict, selection and quantization see the factors only; gradients through the computed
    weight reach them; assigning a weight is refused."""
    from litcompress.quantization import QuantConfig, convert_, quantized_layers
    from litcompress.selection import select_parameters

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    factorize_(model, ["0"], rank=2)
    names = ["0.first.weight", "0.second.weight", "0.second.bias", "2.weight", "2.bias"]
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == names
    assert [r.name for r in select_parameters(model)] == ["0.first.weight", "0.second.weight", "2.weight"]
    model[0].weight.sum().backward()
    assert model[0].first.weight.grad is not None and model[0].second.weight.grad is not None
    with pytest.raises(KeyError, match="already exists"):
        model[0].weight = nn.Parameter(torch.zeros(16, 16))
    with pytest.raises(AttributeError):
        model[0].weight = torch.zeros(16, 16)
    convert_(model, QuantConfig(), ["0.first", "0.second", "2"])
    assert sorted(quantized_layers(model)) == ["0.first", "0.second", "2"]
    assert tuple(model[0].weight.shape) == (16, 16)  # the float product of the quantization-aware factors


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"rank": 5}, True),  # 5 * (12 + 10) = 110 < 120
    ({"rank": 6}, False),  # 132 >= 120: kept dense
    ({"rank_ratio": 0.5}, True),  # ceil(0.5 * 10) = 5
    ({"rank_ratio": 0.6}, False),  # 6
    ({"energy": 0.99}, True),  # the rank depends on the weights: 1 would cut them
])
def test_may_factorize_is_what_factorize_does(kwargs, expected):
    layer = nn.Linear(12, 10)
    assert may_factorize(layer, **kwargs) is expected
    if "energy" not in kwargs:
        model = nn.Sequential(layer)
        assert factorize_(model, ["0"], **kwargs)["0"].factorized is expected
