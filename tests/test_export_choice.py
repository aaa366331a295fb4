"""choose_int8 / export_onnx(int8=...): int8 only on the layers where ONNX Runtime runs the model faster that way.

The decisions are tested with a stand-in timer (`measure`) whose latencies come from which layers each exported file
really holds as int8 (read back from the ONNX graph), so the search is checked against the files it exports; the
real ONNX Runtime timing runs too, asserting only what holds whatever the timings are.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from litcompress import QuantizationAwareTraining
from litcompress.export import Int8Choice, choose_int8, export_onnx
from litcompress.quantization import QuantConfig, convert_, quantized_layers
from tests.helpers import fit
from tests.models import ZOO

LAYERS = ("net.0", "net.2", "net.4")


def quantized_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """ZOO's MLP (16-32-32-4), every Linear quantized W8A8 with observed activation ranges, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO["mlp"].build()
    x = torch.randn(32, 16)
    layers = convert_(model, QuantConfig(), list(LAYERS))
    for layer in layers.values():
        layer.fake_quant_enabled = True
    with torch.no_grad():
        model.train()(x)
    for layer in layers.values():
        for quantizer in layer.input_quantizers.values():
            quantizer.commit()
    return model.eval(), x


def scopes(node: onnx.NodeProto) -> list[str]:
    meta = {p.key: p.value for p in node.metadata_props}
    return eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))  # a list literal written by torch's exporter


def int8_structure(path) -> tuple[set[str], set[str], set[str]]:
    """(layers with an int8 weight initializer behind a DequantizeLinear, layers with a QuantizeLinear, names of the
    float initializers), read from the exported graph."""
    graph = onnx.load(str(path)).graph
    int8_inits = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    float_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    weights, quantize = set(), set()
    for node in graph.node:
        layer = next((s for s in reversed(scopes(node)) if s in LAYERS or s.startswith("model.")), None)
        if node.op_type == "DequantizeLinear" and node.input[0] in int8_inits:
            weights.add(layer)
        if node.op_type == "QuantizeLinear":
            quantize.add(layer)
    return weights, quantize, float_inits


def check_file(path, model, x, int8: set[str]) -> None:
    """The file holds exactly `int8` as integer layers and runs, in ONNX Runtime, like the torch model with the
    other layers' fake quantization off."""
    layers = {n: m for n, m in quantized_layers(model).items() if m.fake_quant_enabled}
    weights, quantize, float_inits = int8_structure(path)
    assert weights == int8 and quantize == int8, (weights, quantize, int8)
    for name in set(layers) - int8:  # float layers: their float weight, no Q/DQ
        assert f"{name}.weight" in float_inits
    for name in int8:
        assert f"{name}.weight" not in float_inits
    for name in set(layers) - int8:
        layers[name].fake_quant_enabled = False
    try:
        with torch.no_grad():
            expected = model(x).numpy()
    finally:
        for layer in layers.values():
            layer.fake_quant_enabled = True
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - expected).max() <= 0.02 * (np.abs(expected).max() + 1e-6)
    assert (out.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


class Timer:
    """A stand-in for ONNX Runtime: the latency of each file from the layers it holds as int8 (read from the graph),
    through `cost(int8_layers) -> seconds`. Records every call."""

    def __init__(self, cost) -> None:
        self.cost, self.calls = cost, []

    def __call__(self, paths):
        held = [frozenset(int8_structure(p)[0]) for p in paths]
        self.calls.append(held)
        return [self.cost(h) for h in held]


def additive(base: float, **delta: float):
    """Latency = base + delta of each int8 layer (keys use `_` for `.`)."""
    return lambda held: base + sum(delta.get(name.replace(".", "_"), 0.0) for name in held)


@pytest.mark.parametrize(("cost", "expected"), [
    (additive(1.0, net_0=-0.2, net_2=-0.2, net_4=-0.2), {"net.0", "net.2", "net.4"}),  # int8 pays everywhere
    (additive(1.0, net_0=0.1, net_2=0.1, net_4=0.1), set()),  # nowhere
    (additive(1.0, net_0=-0.3, net_2=-0.1, net_4=0.2), {"net.0", "net.2"}),  # a wide layer pays, a narrow one not
    (additive(1.0, net_0=0.3, net_2=-0.2, net_4=-0.1), {"net.2", "net.4"}),  # all-float start, then switched
    # integer kernels need int8 neighbours: each layer alone in int8 slows the float model, all three together
    # run 3x faster (the MLP 784-512-256-10 measured so) -> the search starts from all-int8 and keeps it
    (lambda held: {0: 1.0, 1: 1.2, 2: 1.1, 3: 0.33}[len(held)], {"net.0", "net.2", "net.4"}),
])
def test_choice_follows_the_timings_of_the_files_it_exports(cost, expected):
    model, x = quantized_mlp()
    timer = Timer(cost)
    choice = choose_int8(model, x, measure=timer)
    assert set(choice.int8_layers) == expected and list(choice.int8_layers) == [n for n in LAYERS if n in expected]
    assert [row.name for row in choice.layers] == list(LAYERS)
    assert [row.int8 for row in choice.layers] == [n in expected for n in LAYERS]
    for row in choice.layers:
        assert row.int8_ms > 0 and row.float_ms > 0
    assert choice.exported_ms == pytest.approx(1e3 * cost(frozenset(expected)))
    assert choice.float_ms == pytest.approx(1e3 * cost(frozenset())) and not choice.fell_back
    assert choice.exported_ms <= choice.float_ms
    assert timer.calls[0] == [frozenset(), frozenset(LAYERS)]  # all-float and all-int8 first
    assert ("int8 pays on no layer" in choice.note) == (not expected)
    assert all(m.fake_quant_enabled for m in quantized_layers(model).values()) and not model.training


def test_each_switch_is_timed_against_the_current_choice():
    model, x = quantized_mlp()
    timer = Timer(additive(1.0, net_0=-0.3, net_2=-0.1, net_4=0.2))
    choice = choose_int8(model, x, measure=timer)
    every = frozenset(LAYERS)
    assert timer.calls[1:] == [
        [every - {"net.0"}, every],  # from all-int8: each layer tried as float
        [every - {"net.2"}, every],
        [every - {"net.4"}, every],
        [every - {"net.4"}, frozenset(), every],  # the last check: the choice, all-float, all-int8
    ]
    row = choice.layers[2]  # net.4: the model with it int8 (1.0 - 0.2) vs float (1.0 - 0.4)
    assert (row.int8_ms, row.float_ms) == (pytest.approx(1e3 * 0.8), pytest.approx(1e3 * 0.6))


def test_margin_keeps_float_unless_int8_clearly_pays():
    model, x = quantized_mlp()
    cost = additive(1.0, net_0=-0.005, net_2=-0.005, net_4=-0.005)  # 1.5% faster as int8
    assert choose_int8(model, x, measure=Timer(cost)).int8_layers == ()
    assert choose_int8(model, x, measure=Timer(cost), margin=0.0).int8_layers == LAYERS


def test_falls_back_to_float_when_the_last_check_says_so():
    model, x = quantized_mlp()
    calls = []

    def measure(paths):  # int8 wins every comparison of the search, loses the final one (a noisy machine)
        calls.append(len(paths))
        held = [int8_structure(p)[0] for p in paths]
        if len(calls) > 1 + len(LAYERS):
            return [0.5 if not h else 0.9 for h in held]
        return [1.0 - 0.1 * len(h) for h in held]

    choice = choose_int8(model, x, measure=measure)
    assert choice.fell_back and choice.int8_layers == () and not any(row.int8 for row in choice.layers)
    assert choice.exported_ms == choice.float_ms == 500.0 and choice.all_int8_ms == 900.0
    assert "fell back to float" in choice.note and "fell back to float" in str(choice)


def test_report_table_and_dict():
    model, x = quantized_mlp()
    choice = choose_int8(model, x, measure=Timer(additive(1.0, net_0=-0.3, net_2=-0.1, net_4=0.2)))
    lines = str(choice).splitlines()
    assert lines[0].startswith("int8 or float per quantized layer (ONNX Runtime, batch 32,")
    assert lines[1].split() == ["layer", "int8", "ms", "float", "ms", "chosen"]
    assert lines[2].split() == ["net.0", "800.000", "1100.000", "int8"]  # the model with net.0 int8 / float
    assert lines[4].split() == ["net.4", "800.000", "600.000", "float"]
    assert lines[5] == "all int8 800.000 ms | all float 1000.000 ms | exported 600.000 ms, int8 in 2 of 3 layers"
    data = json.loads(json.dumps(choice.to_dict()))
    assert data["int8_layers"] == ["net.0", "net.2"] and data["layers"][0]["name"] == "net.0"


def test_export_writes_the_choice(tmp_path):
    """The real file: float layers hold their float weight and no QuantizeLinear, int8 layers an int8 initializer
    and a QuantizeLinear; ONNX Runtime agrees with the torch model run the same way."""
    model, x = quantized_mlp()
    choice = choose_int8(model, x, measure=Timer(additive(1.0, net_0=-0.3, net_2=-0.1, net_4=0.2)))
    for int8, expected in [(choice, {"net.0", "net.2"}), (["net.4"], {"net.4"}), ("all", set(LAYERS)),
                           ("none", set()), ((), set())]:
        path = export_onnx(model, x, tmp_path / "model.onnx", int8=int8)
        check_file(path, model, x, expected)
        assert all(m.fake_quant_enabled for m in quantized_layers(model).values()) and not model.training


def test_real_timing_never_exports_slower_than_float(tmp_path):
    """ONNX Runtime timing for real: which layers win depends on the machine, what holds whatever they are is
    checked (every row measured, the export no slower than all-float, the file holding what was chosen)."""
    model, x = quantized_mlp()
    model.train()
    choice = choose_int8(model, x, repeats=3, warmup=1, rounds=1, threads=1)  # 3 timed runs per file
    assert isinstance(choice, Int8Choice) and choice.threads == 1 and choice.batch_size == 32
    assert [row.name for row in choice.layers] == list(LAYERS)
    assert all(row.int8_ms > 0 and row.float_ms > 0 for row in choice.layers)
    assert choice.exported_ms is not None and choice.float_ms is not None
    assert choice.exported_ms < choice.float_ms or (choice.int8_layers == () and choice.exported_ms == choice.float_ms)
    assert model.training  # restored
    check_file(export_onnx(model, x, tmp_path / "chosen.onnx", int8=choice), model.eval(), x,
               set(choice.int8_layers))


def test_after_a_qat_fit_auto_export(tmp_path, caplog):
    _, module = fit(tmp_path, [QuantizationAwareTraining(verbose=False)], max_epochs=1)
    module.eval()
    x = ZOO["mlp"].data().tensors[0][:64]
    names = [n for n, m in quantized_layers(module).items() if m.fake_quant_enabled]
    assert names == ["model.net.0", "model.net.2", "model.net.4"]
    with caplog.at_level(logging.INFO, logger="litcompress.export"):
        path = export_onnx(module, x, tmp_path / "auto.onnx", int8="auto")
    assert "int8 or float per quantized layer" in caplog.text
    chosen = int8_structure(path)[0]
    assert chosen <= set(names)
    for name in names:  # the logged table's row for each layer says what the file holds
        row = next(line for line in caplog.text.splitlines() if line.startswith(name + " "))
        assert row.split()[-1] == ("int8" if name in chosen else "float")
    check_file(path, module, x, chosen)
    # the same fit, a chosen mix through a stand-in timer: the file holds it
    cost = {"model.net.0": -0.3, "model.net.2": 0.1, "model.net.4": 0.1}
    choice = choose_int8(module, x, measure=Timer(lambda held: 1.0 + sum(cost[n] for n in held)))
    assert choice.int8_layers == ("model.net.0",)
    check_file(export_onnx(module, x, tmp_path / "mix.onnx", int8=choice), module, x, {"model.net.0"})


def test_float_model_has_nothing_to_choose(tmp_path):
    model = ZOO["mlp"].build().eval()
    x = torch.randn(4, 16)
    choice = choose_int8(model, x, measure=lambda paths: pytest.fail("nothing to time"))
    assert choice.int8_layers == () and choice.layers == () and choice.exported_ms is None
    assert "no quantized layer in force" in str(choice)
    path = export_onnx(model, x, tmp_path / "float.onnx", int8="auto")
    assert not any("Quantize" in n.op_type for n in onnx.load(str(path)).graph.node)


def test_int8_misconfiguration(tmp_path):
    model, x = quantized_mlp()
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"Expected argument `int8` to be 'all', 'none', 'auto'.*but got 'fast'"):
        export_onnx(model, x, path, int8="fast")
    with pytest.raises(ValueError, match=r"`int8` to be names of this model's quantized layers.*\['net\.1'\].*"
                                         r"HINT: those are \['net\.0', 'net\.2', 'net\.4'\]"):
        export_onnx(model, x, path, int8=["net.0", "net.1"])
    with pytest.raises(TypeError, match=r"`int8` to be 'all', 'none', 'auto', an Int8Choice.*but got 'int'"):
        export_onnx(model, x, path, int8=8)
    with pytest.raises(ValueError, match=r"HINT: this model has none: pass int8='all'"):
        export_onnx(ZOO["mlp"].build(), x, path, int8=["net.0"])
    with pytest.raises(TypeError, match="`dynamic_batch` to be a bool"):
        export_onnx(model, x, path, dynamic_batch="yes")
    assert not path.exists()


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(repeats=0), ValueError, r"`repeats` to be an int >= 1, but got 0"),
    (dict(warmup=-1), ValueError, r"`warmup` to be an int >= 0"),
    (dict(rounds=0), ValueError, r"`rounds` to be an int >= 1"),
    (dict(threads=0), ValueError, r"`threads` to be an int >= 1"),
    (dict(threads=1.5), TypeError, r"`threads` to be an int or None"),
    (dict(margin=1.5), ValueError, r"`margin` to be a float in the \[0, 1\) range, but got 1.5"),
    (dict(dynamic_batch=1), TypeError, r"`dynamic_batch` to be a bool"),
    (dict(measure="ort"), TypeError, r"`measure` to be a callable taking a list of ONNX files"),
    (dict(measure=lambda paths: [1.0]), ValueError, r"`measure` to be a callable returning 2 positive.*\[1.0\]"),
    (dict(measure=lambda paths: [0.0, float("nan")]), ValueError, r"`measure` to be a callable returning 2 positive"),
])
def test_choose_int8_misconfiguration(kwargs, exc, match):
    model, x = quantized_mlp()
    with pytest.raises(exc, match=match):
        choose_int8(model, x, **kwargs)
    assert all(m.fake_quant_enabled for m in quantized_layers(model).values())


def test_choose_int8_bad_model_or_input():
    model, x = quantized_mlp()
    with pytest.raises(TypeError, match="`model`"):
        choose_int8("model", x)
    with pytest.raises(TypeError, match="`example_input`"):
        choose_int8(model, [1, 2])
    with pytest.raises(ValueError, match="`example_input` to be an input the model accepts"):
        choose_int8(model, torch.randn(4, 3), measure=lambda paths: [1.0] * len(paths))
