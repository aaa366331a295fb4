"""The public door into quantized layers: quantized_layers, quantized_weights, fake_quant, export_mode."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from litcompress.export import export_onnx
from litcompress.quantization import (
    QuantConfig,
    convert_,
    export_mode,
    fake_quant,
    quantized_layers,
    quantized_weights,
)


def _converted(activation_bits=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    convert_(model, QuantConfig(activation_bits=activation_bits), ["0", "2"])
    return model


def test_quantized_layers_and_weights():
    model = _converted()
    assert list(quantized_layers(model)) == ["0", "2"]
    assert quantized_weights(model) == {}  # converted, but fake quantization is off
    model[0].fake_quant_enabled = True
    (name, (quantizer, weight)), = quantized_weights(model).items()
    assert name == "0.weight" and weight is model[0].weight and quantizer is model[0].weight_quantizers["weight"]
    assert quantized_layers(nn.Linear(2, 2)) == {}
    with pytest.raises(TypeError, match="`model`"):
        quantized_layers("model")


def test_fake_quant_switches_and_restores_each_layer():
    model = _converted(activation_bits=None)
    model[0].fake_quant_enabled = True  # a mixed state must come back as it was
    x = torch.randn(5, 4)
    with torch.no_grad():
        with fake_quant(model, False) as layers:
            assert set(layers) == {"0", "2"} and not any(m.fake_quant_enabled for m in layers.values())
            plain = model(x)
        with fake_quant(model, True):
            quantized = model(x)
    assert model[0].fake_quant_enabled and not model[2].fake_quant_enabled
    first = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
    reference = model[4](torch.relu(model[2](torch.relu(first))))
    assert torch.allclose(plain, reference) and not torch.allclose(quantized, plain)
    with pytest.raises(RuntimeError), fake_quant(model, False):  # restored on an exception too
        raise RuntimeError
    assert model[0].fake_quant_enabled and not model[2].fake_quant_enabled
    with pytest.raises(TypeError, match="`enabled`"), fake_quant(model, 1):
        pass


def test_export_mode_freezes_integer_weights_and_releases_them():
    model = _converted()
    x = torch.randn(16, 4)
    with fake_quant(model, True):
        model.train()
        model(x)  # observe activation ranges
        for layer in quantized_layers(model).values():
            for q in layer.input_quantizers.values():
                q.commit()
        model.eval()
        with torch.no_grad():
            expected = model(x)
            with export_mode(model) as count:
                assert count == 2
                assert all(q.exporting for m in quantized_layers(model).values() for q in m.weight_quantizers.values())
                exported = model(x)
    assert not any(q.exporting for m in quantized_layers(model).values() for q in m.weight_quantizers.values())
    assert torch.allclose(exported, expected, atol=1e-5)


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x):  # x: (N, L, E)
        x = x if self.batch_first else x.transpose(0, 1)
        out = self.attn(x, x, x, need_weights=False)[0]
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_shares_one_input_quantizer_in_both_layouts(tmp_path, batch_first):
    torch.manual_seed(0)
    model = SelfAttention(batch_first)
    convert_(model, QuantConfig(), ["attn"])
    x = torch.randn(4, 5, 8)
    with fake_quant(model, True):
        model.train()
        model(x)
        quantizers = model.attn.input_quantizers
        assert quantizers["query"].pending is not None
        assert quantizers["key"].pending is None and quantizers["value"].pending is None  # query's is reused
        for q in quantizers.values():
            q.commit()
        path = export_onnx(model, x, tmp_path / "attn.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 2, ops  # the shared q/k/v input and the output projection's input
