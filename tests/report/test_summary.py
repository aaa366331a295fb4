"""`summarize` against independent counts on the model zoo: parameters, nonzeros, bits, file bytes, FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from litcompress.export import save_compressed
from litcompress.quantization import QuantConfig, convert_
from litcompress.report import compare, format_table, summarize
from tests.models import ZOO


def unique_numel(model: nn.Module) -> int:
    seen, total = set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):  # each storage once, by address
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


@pytest.mark.parametrize("name", list(ZOO))
def test_counts_and_file_size_on_the_zoo(name, tmp_path):
    torch.manual_seed(0)
    entry = ZOO[name]
    model = entry.build()
    with torch.no_grad():  # zero a known share of every matrix
        zeros = 0
        for p in model.parameters():
            if p.dim() >= 2:
                cut = p.numel() // 3
                p.view(-1)[:cut] = 0
        zeros = sum(int((p == 0).sum()) for p in set(model.parameters()))
    x = entry.data().tensors[0][:4]
    s = summarize(model, x, latency=False)
    assert s.parameters == unique_numel(model)
    assert s.nonzero == s.parameters - zeros
    assert s.bits_per_weight == 32.0
    assert s.compact_bytes == save_compressed(model, tmp_path / "m.safetensors").stat().st_size
    assert s.fp32_bytes > 4 * s.parameters  # the float32 file holds every parameter, plus buffers and a header
    assert s.flops > 0 and s.sparse_flops <= s.flops and s.batch_size == 4
    assert {layer.name for layer in s.layers} == {n for n, p in model.named_parameters() if p.dim() >= 2}


def test_flops_match_hand_counts():
    model = ZOO["mlp"].build()  # 16-32-32-4
    x = torch.randn(5, 16)
    dense = 2 * 5 * (16 * 32 + 32 * 32 + 32 * 4)
    with torch.no_grad():
        model.net[2].weight[:, :16] = 0  # half of the middle matrix
    s = summarize(model, x, latency=False)
    assert s.flops == dense
    assert s.sparse_flops == dense - 2 * 5 * (32 * 16)
    conv = ZOO["cnn"].build()  # width 8, 8x8 images, padding 1: every conv keeps 8x8
    s = summarize(conv, torch.randn(2, 1, 8, 8), latency=False)
    convs = 2 * 2 * 64 * 8 * 9 * (1 + 8 + 8)  # 2 FLOPs x batch x positions x out channels x (in channels x 3x3)
    assert s.flops == convs + 2 * 2 * 32 * 4  # + the linear head


def test_quantized_bits_and_onnx_latency():
    torch.manual_seed(0)
    model = ZOO["mlp"].build()
    layers = convert_(model, QuantConfig(weight_bits=4, activation_bits=None), ["net.0", "net.2", "net.4"])
    for layer in layers.values():
        layer.fake_quant_enabled = True
    s = summarize(model, torch.randn(8, 16), repeats=3, warmup=1)
    weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    biases = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert s.quantized and s.bits_per_weight == pytest.approx((4 * weights + 32 * biases) / (weights + biases))
    assert {layer.bits for layer in s.layers} == {4}
    assert s.latency_eager > 0 and s.latency_onnx > 0  # ONNX Runtime ran the exported int model
    assert s.latency_onnx_fp32 > 0 and all(m.fake_quant_enabled for m in layers.values())  # and the float export
    plain = summarize(ZOO["mlp"].build(), torch.randn(8, 16), repeats=3, warmup=1)
    assert plain.latency_eager > 0 and plain.latency_onnx is None and plain.latency_onnx_fp32 is None


def test_round_trip_and_table():
    s = summarize(ZOO["mlp"].build(), torch.randn(2, 16), latency=False)
    assert type(s).from_dict(s.to_dict()) == s
    rows = compare(s, s, {"val/acc": 0.5}, {"val/acc": 0.25, "val/f1": 0.1})
    by_name = {r["name"]: r for r in rows}
    assert by_name["val/acc"]["ratio"] == 0.5 and by_name["val/f1"]["before"] is None
    assert "latency, torch eager (ms)" not in by_name  # not measured: no row
    text = format_table(rows, use_rich=False)
    assert "val/f1" in text and "n/a" in text and "0.500x" in text


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`example_input` to be an input the model accepts.*shape \(2, 3\)"):
        summarize(ZOO["mlp"].build(), torch.randn(2, 3), latency=False)
    with pytest.raises(TypeError, match="`example_input`"):
        summarize(ZOO["mlp"].build(), [1, 2])
    with pytest.raises(TypeError, match="`model`"):
        summarize("mlp", torch.randn(2, 16))


def test_tied_weight_counted_and_stored_once(tmp_path):
    torch.manual_seed(0)
    model = ZOO["gpt"].build()  # dense, tok and lm_head share one weight
    convert_(model, QuantConfig(weight_bits=4, activation_bits=None), ["tok", "lm_head"])
    for layer in (model.tok, model.lm_head):
        layer.fake_quant_enabled = True
    s = summarize(model, ZOO["gpt"].data().tensors[0][:2], latency=False)
    assert s.parameters == unique_numel(model)
    assert [layer.name for layer in s.layers].count("tok.weight") == 1
    assert "lm_head.weight" not in [layer.name for layer in s.layers]
    assert {layer.bits for layer in s.layers if layer.name == "tok.weight"} == {4}
    tied = model.tok.weight.numel()
    bits = (4 * tied + 32 * (s.parameters - tied)) / s.parameters  # the tied tensor's 4 bits counted once
    assert s.bits_per_weight == pytest.approx(bits)
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    convert_(untied, QuantConfig(weight_bits=4, activation_bits=None), ["lm_head"])
    untied.lm_head.fake_quant_enabled = True
    two = summarize(untied, ZOO["gpt"].data().tensors[0][:2], latency=False)
    assert two.parameters == s.parameters + tied and s.compact_bytes < two.compact_bytes - tied // 2  # int4: 1/2 byte


@pytest.mark.parametrize("how", ["module.compile", "torch.compile"])
def test_counting_flops_leaves_a_compiled_model_compiling(how):
    """FLOPs are counted under a dispatch mode, where TorchDynamo marks the code it enters never to be compiled again:
    a compiled model measured by `summarize` (as `CompressionReport` does before the first step) ran eagerly for the
    rest of the fit. `summarize` counts the plain forward, and the model compiles at its next call."""

    class Net(nn.Module):  # a class of its own: TorchDynamo's marks are per code object, for the whole process
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x).relu()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    net = Net()
    if how == "module.compile":
        net.compile(backend=backend)
    model = torch.compile(net, backend=backend) if how == "torch.compile" else net
    x = torch.randn(2, 8)
    assert summarize(model, x, latency=False).flops == 2 * 2 * 8 * 4
    assert not graphs  # counted on the plain forward
    model(x)
    assert len(graphs) == 1  # and compiled at the next call
