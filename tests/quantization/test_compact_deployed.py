"""Reloading is deploying: a compact file of a model that quantized activations (format 4) records its quantized
layers, and `load_compressed` into a freshly built model gives back the model that computed: the trained
(fake-quantized) model's outputs, and its ONNX file's. A damaged or crafted record is a `ValueError` with the model
left exactly as it was (its classes too); files of format 3 still load; a model of other shapes is told which."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from litcompress import QuantizationAwareTraining
from litcompress.export import export_onnx
from litcompress.quantization import QuantConfig, convert_, fake_quant, quantized_layers
from litcompress.quantization._layout import checksum
from litcompress.quantization.compact import load_compressed, save_compressed
from tests.helpers import fit
from tests.models import ZOO, LitClassifier

FORMAT_4 = "litcompress.compact/4"


def ort_outputs(path, x, optimized: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_a_w8a8_cnn_trained_in_a_fit_reloads_as_the_deployed_model(tmp_path):
    """The issue's case: a small CNN (conv -> BatchNorm -> ReLU, a residual block, a linear head) trained W8A8 in a
    real fit, saved, and loaded into a fresh model as a new user would. It used to run float activations (its logits
    off by 1.53 from the trained model's and the ONNX file's on MNIST); now it is the trained model, and the same
    ONNX file."""
    _, trained = fit(tmp_path, [QuantizationAwareTraining(verbose=False)], model="cnn", n=None, max_epochs=1)
    trained.eval()
    x = ZOO["cnn"].data().tensors[0][:32]
    path = save_compressed(trained, tmp_path / "model.safetensors")
    fresh = load_compressed(LitClassifier(ZOO["cnn"].build()), path).eval()  # the documented way
    with torch.no_grad():
        expected, loaded = trained(x), fresh(x)
    torch.testing.assert_close(loaded, expected, rtol=1e-6, atol=1e-6)  # the trained, fake-quantized model
    assert list(quantized_layers(fresh)) == list(quantized_layers(trained))
    onnx_file = export_onnx(trained, x, tmp_path / "trained.onnx", int8="all")
    # ONNX Runtime running the Q/DQ graph as written (QuantizeLinear / DequantizeLinear as float ops): float tolerance
    np.testing.assert_allclose(ort_outputs(onnx_file, x, optimized=False), loaded.numpy(), rtol=1e-5,
                               atol=1e-5 * float(loaded.abs().max()))
    # as deployed, on integer kernels (which round the bias and requantize in their own order): the same predictions
    deployed = ort_outputs(onnx_file, x, optimized=True)
    assert np.abs(deployed - loaded.numpy()).max() <= 0.01 * float(loaded.abs().max())
    assert (deployed.argmax(-1) == loaded.numpy().argmax(-1)).mean() >= 0.97
    # and the reloaded model exports the very same file
    again = export_onnx(fresh, x, tmp_path / "reloaded.onnx", int8="all")
    np.testing.assert_array_equal(ort_outputs(again, x, optimized=True), deployed)
    assert _metadata(path)["format"] == FORMAT_4  # the activation ranges are in the file


def test_a_tied_attention_model_trained_in_a_fit_reloads_exactly(tmp_path):
    """A decoder with attention and an LM head tied to its embedding: the tied weight's layers share one quantizer
    again, as conversion makes it."""
    _, trained = fit(tmp_path, [QuantizationAwareTraining(verbose=False)], model="gpt", n=None, max_epochs=1)
    trained.eval()
    x = ZOO["gpt"].data().tensors[0][:8]
    path = save_compressed(trained, tmp_path / "model.safetensors")
    fresh = LitClassifier(ZOO["gpt"].build())
    fresh.model.lm_head.weight = nn.Parameter(fresh.model.lm_head.weight.detach().clone())  # built untied
    load_compressed(fresh, path).eval()
    assert fresh.model.lm_head.weight is fresh.model.tok.weight
    assert fresh.model.lm_head.weight_quantizers["weight"] is fresh.model.tok.weight_quantizers["weight"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


class Net(nn.Module):
    """A conv (input and output quantized), an embedding (weight-only) and a linear layer (input quantized)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(4 * 4 * 4 + 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, token = x[:, :36].reshape(-1, 1, 6, 6), x[:, 36].long()
        return self.fc(torch.cat([torch.relu(self.conv(image)).flatten(1), self.emb(token)], 1))


def data(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randn(n, 36, generator=g), torch.randint(0, 10, (n, 1), generator=g).float()], 1)


def quantized_net(config: QuantConfig, learn: bool = False, freeze: bool = False) -> Net:
    """A trained-looking model: activation ranges observed over a few batches, optionally learned steps (LSQ) and
    frozen observers."""
    torch.manual_seed(0)
    model = Net()
    layers = convert_(model, config, ["conv", "emb", "fc"])
    for layer in layers.values():
        layer.fake_quant_enabled = True
    model.train()
    for i in range(3):
        x = data(16)
        x[:, :36] *= 1 + i  # the images' ranges widen, batch by batch
        model(x)
        for layer in layers.values():
            for q in layer.input_quantizers.values():
                q.commit()
    for layer in layers.values():
        for key, q in layer.weight_quantizers.items():
            if learn:
                q.start_learning(layer.weight_tensor(key))
                with torch.no_grad():
                    q.scale.mul_(1.3)  # a learned step: not what the weights' range says
            elif freeze:
                q.freeze(layer.weight_tensor(key))
        for q in layer.input_quantizers.values():
            if learn:
                q.start_learning()
                with torch.no_grad():
                    q.scale.mul_(0.8)
            q.observing = not freeze
    return model.eval()


CONFIGS = {
    "w8a8": (QuantConfig(), False, False),
    "w4a8-per-tensor": (QuantConfig(weight_bits=4, weight_granularity="per_tensor"), False, False),
    "w8a4-power-of-two": (QuantConfig(activation_bits=4, scale="power_of_two"), False, True),
    "w6a8-learned": (QuantConfig(weight_bits=6, scale="learned"), True, False),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_every_config_reloads_bit_for_bit_and_saves_the_same_file(tmp_path, case):
    config, learn, freeze = CONFIGS[case]
    model = quantized_net(config, learn, freeze)
    x = data()
    path = save_compressed(model, tmp_path / "a.safetensors")
    fresh = load_compressed(Net(), path).eval()
    with torch.no_grad():
        if learn:  # LSQ's gradient scaling, (s - g s) + g s, moves the step it computes with by an ulp
            torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(fresh(x), model(x))
    for name, layer in quantized_layers(fresh).items():
        original = model.get_submodule(name)
        assert layer.fake_quant_enabled and layer.weight_quantizers["weight"].config == config
        assert all(q.frozen for q in layer.weight_quantizers.values())  # the deployed scales, whatever trained them
        for key, q in layer.input_quantizers.items():  # a learned step still computes; no range is observed
            assert q.learning == original.input_quantizers[key].learning and not q.observing
    # the file of the reloaded model is the file it came from: the same metadata, the same tensors
    again = save_compressed(fresh, tmp_path / "b.safetensors")
    assert _metadata(again) == _metadata(path)
    first, second = load_file(str(path)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_loading_into_a_converted_model(tmp_path):
    """A model converted alike keeps its quantizer objects (a QAT callback points at them); one converted otherwise
    is converted as the file says; a quantized layer the file does not record is switched off, as it was saved."""
    model = quantized_net(QuantConfig())
    model.emb.fake_quant_enabled = False  # saved with its float weight
    x = data()
    path = save_compressed(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        expected = model(x)
    same = quantized_net(QuantConfig())
    keep = same.conv.weight_quantizers["weight"], same.fc.input_quantizers["input"]
    load_compressed(same, path)
    assert (same.conv.weight_quantizers["weight"], same.fc.input_quantizers["input"]) == keep
    assert not same.emb.fake_quant_enabled
    other = quantized_net(QuantConfig(weight_bits=4, activation_bits=6))
    load_compressed(other, path)
    assert other.conv.weight_quantizers["weight"].config == QuantConfig() and not other.emb.fake_quant_enabled
    with torch.no_grad():
        assert torch.equal(same(x), expected) and torch.equal(other(x), expected)


def test_weight_only_models_keep_format_3_and_compute_the_same_in_a_float_model(tmp_path):
    model = quantized_net(QuantConfig(weight_bits=4, activation_bits=None))
    path = save_compressed(model, tmp_path / "w4.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "litcompress.compact/3" and "quantization" not in f.metadata()
    fresh = load_compressed(Net(), path).eval()
    assert not quantized_layers(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(data()), model(data()))


def test_a_file_of_format_3_of_a_w8a8_model_still_loads_its_weights(tmp_path):
    """Written by the previous release: the weights, without the activation ranges (a float model)."""
    model = quantized_net(QuantConfig())
    path = save_compressed(model, tmp_path / "v4.safetensors")
    tensors, layout = load_file(str(path)), json.loads(_metadata(path)["layout"])
    old = _write(tmp_path / "v3.safetensors", tensors, layout, None, fmt="litcompress.compact/3")
    fresh = load_compressed(Net(), old)
    assert not quantized_layers(fresh)
    with fake_quant(model, True):
        assert torch.equal(fresh.fc.weight, model.fc.weight_quantizers["weight"](model.fc.weight))


# ------------------------------------------------------------------------------------------ damaged or crafted
def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _write(path, tensors, layout, record, fmt=FORMAT_4, sha=True, **extra):
    """A file as save_compressed would write it, the checksum recomputed: a crafted file, not a damaged one."""
    text = json.dumps(layout)
    metadata = {"format": fmt, "layout": text}
    body = text
    if record is not None:
        metadata["quantization"] = record if isinstance(record, str) else json.dumps(record)
        body = json.dumps([text, metadata["quantization"]])
    if sha:
        metadata["sha256"] = checksum(fmt, body, tensors)
    metadata.update(extra)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = save_compressed(quantized_net(QuantConfig()), tmp_path_factory.mktemp("v4") / "intact.safetensors")
    metadata = _metadata(path)
    return path, load_file(str(path)), json.loads(metadata["layout"]), json.loads(metadata["quantization"])


def _unchanged_on_error(path, match):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=match) as err:
        load_compressed(model, path)
    assert {name: type(m) for name, m in model.named_modules()} == classes, "a layer was converted before the error"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "the weights changed"
    assert not any(hasattr(m, "weight_quantizers") for m in model.modules())
    return str(err.value)


def _edited(record, edit):
    record = copy.deepcopy(record)
    edit(record)
    return record


RECORD_DAMAGE = {
    "renamed layer": (lambda r: r.__setitem__("head", r.pop("fc")), r"the layer `head` stores its weight `weight` "
                      r"under `fc\.weight`, which is not that weight"),
    "unknown layer": (lambda r: r.__setitem__("head", dict(r.pop("fc"), weights={})),
                      r"`model` to be a model with the quantized layer `head` of the file"),
    "other kind": (lambda r: r["fc"].__setitem__("kind", "Conv2d"), r"`model` to be a model whose `fc` is a Conv2d"),
    "bad config": (lambda r: r["fc"]["config"].__setitem__("weight_bits", 9), r"the layer `fc` has a config "
                   r"QuantConfig refuses: Expected argument `weight_bits`"),
    "config field missing": (lambda r: r["fc"]["config"].pop("scale"), r"`fc` has config=.*not an object of the"),
    "bits differ": (lambda r: r["fc"]["config"].__setitem__("weight_bits", 4), r"quantizes `weight` to 4 bits, where "
                    r"`fc\.weight` holds 8-bit integers"),
    "granularity differs": (lambda r: r["fc"]["config"].__setitem__("weight_granularity", "per_tensor"),
                            r"quantizes `weight` per_tensor, where `fc\.weight` holds scales along axis 0"),
    "weight stored elsewhere": (lambda r: r["fc"]["weights"].__setitem__("weight", "conv.weight"),
                                r"under `conv\.weight`, which is not that weight"),
    "weight not quantized": (lambda r: r["fc"]["weights"].__setitem__("weight", "fc.bias"),
                             r"under `fc\.bias`, which the layout does not hold as integer weights"),
    "range reversed": (lambda r: r["fc"]["activations"]["input"].update(lo=2.0, hi=1.0), r"the range \[2\.0, 1\.0\]"),
    "half a range": (lambda r: r["fc"]["activations"]["input"].__setitem__("hi", None), r"both ends or neither"),
    "zero point out of range": (lambda r: r["fc"]["activations"]["input"].update(scale=0.1, zero_point=256),
                                r"zero_point=256 for its activation `input`, not an int in \[0, 255\]"),
    "step of zero": (lambda r: r["fc"]["activations"]["input"].update(scale=0.0, zero_point=3),
                     r"scale=0\.0 for its activation `input`, not a finite positive number"),
    "step without zero point": (lambda r: r["fc"]["activations"]["input"].__setitem__("scale", 0.1),
                                r"a state of its activation `input` that is not an object of the fields \['hi', "
                                r"'lo'\], and \['scale', 'zero_point'\] when learned"),
    "a string for a range": (lambda r: r["fc"]["activations"]["input"].__setitem__("lo", "-1"),
                             r"lo='-1' for its activation `input`, not a finite number"),
    "activation the layer lacks": (lambda r: r["fc"]["activations"].__setitem__(
        "output", r["fc"]["activations"]["input"]), r"`fc` quantizes the activations \['input', 'output'\]"),
    "activations of weight-only": (lambda r: r["emb"]["activations"].__setitem__(
        "input", r["fc"]["activations"]["input"]), r"quantizes the activations \['input'\], as in the file"),
    "activation ranges with activation_bits None": (
        lambda r: r["fc"]["config"].__setitem__("activation_bits", None), r"yet its config quantizes weights only"),
    "unknown field": (lambda r: r["fc"].__setitem__("note", 1), r"`fc` is not an object of the fields"),
}


@pytest.mark.parametrize("case", sorted(RECORD_DAMAGE))
def test_a_crafted_record_is_refused_and_the_model_left_as_it_was(saved, tmp_path, case):
    _, tensors, layout, record = saved
    edit, match = RECORD_DAMAGE[case]
    path = _write(tmp_path / "f.safetensors", tensors, layout, _edited(record, edit))
    _unchanged_on_error(path, match)


def test_damaged_metadata_is_refused(saved, tmp_path):
    path, tensors, layout, record = saved
    metadata = _metadata(path)
    edited = dict(metadata, quantization=metadata["quantization"].replace('"hi":', '"hi":1', 1))  # a wider range
    assert edited != metadata
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=edited)  # the checksum not recomputed
    _unchanged_on_error(tmp_path / "edited.safetensors", r"its checksum does not match its contents")
    for name, (rec, kwargs, match) in {
        "no record": (None, {}, r"its metadata has no 'quantization', which every file of format "),
        "not json": ('{"fc": ', {}, r"its 'quantization' is not valid JSON"),
        "NaN": (json.dumps(record).replace('"lo":', '"lo":NaN,"x":', 1), {}, r"not valid JSON \(NaN is not a JSON"),
        "a list": ("[]", {}, r"its 'quantization' is a JSON list"),
        "no checksum": (record, {"sha": False}, r"its metadata has no checksum"),
        "a later format": (record, {"fmt": "litcompress.compact/5"}, r"a file written by save_compressed \(format "
                           r"'litcompress\.compact/4' or earlier\).*format='litcompress\.compact/5'"),
    }.items():
        target = _write(tmp_path / f"{name}.safetensors", tensors, layout, rec, **kwargs)
        _unchanged_on_error(target, match)


def test_random_record_edits_are_refused_or_load(saved, tmp_path):
    """Seeded: fields deleted, added, retyped or changed anywhere in the record; a ValueError with the model as it
    was, or a valid file that loads."""
    _, tensors, layout, record = saved
    rng = random.Random(7)
    junk = [None, True, 0, -1, 1.5, 300, "x", "fc.weight", [], {}, float("inf")]
    outcomes = {"rejected": 0, "loaded": 0}
    for n in range(150):
        edited = copy.deepcopy(record)
        parent = edited
        while True:  # walk down to a random dict
            key = rng.choice(sorted(parent))
            if isinstance(parent[key], dict) and parent[key] and rng.random() < 0.7:
                parent = parent[key]
                continue
            break
        kind = rng.choice(["delete", "add", "junk", "junk"])
        if kind == "delete":
            del parent[key]
        elif kind == "add":
            parent[f"extra{n}"] = rng.choice(junk)
        else:
            parent[key] = rng.choice(junk)
        text = json.dumps(edited).replace("Infinity", "1e999")  # JSON has no inf: a number that overflows
        path = _write(tmp_path / f"r{n}.safetensors", tensors, layout, text)
        model = Net()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            load_compressed(model, path)
            outcomes["loaded"] += 1
        except ValueError as err:
            assert str(err).startswith(("Expected argument `path`", "Expected argument `model`")), err
            assert not quantized_layers(model) and all(torch.equal(model.state_dict()[k], v)
                                                       for k, v in before.items())
            outcomes["rejected"] += 1
        path.unlink()
    assert outcomes["rejected"] > 100, outcomes


def test_a_model_whose_layer_does_not_convert_as_recorded_is_refused(saved, tmp_path):
    path, *_ = saved

    class Other(Net):
        def __init__(self) -> None:
            super().__init__()
            self.fc = type("MyLinear", (nn.Linear,), {"forward": lambda self, x: x})(72, 3)  # its own forward

    model = Other()
    model.fc.__class__.__name__ = "Linear"  # named as the file says, yet not a layer convert_ takes
    classes = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"`model` to be a model whose layers convert as the file's quantized layers"):
        load_compressed(model, path)
    assert {name: type(m) for name, m in model.named_modules()} == classes


# ------------------------------------------------------------------------------------------------- other shapes
def test_a_model_of_other_shapes_is_told_every_shape_that_differs(tmp_path):
    def cnn(hidden: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 24 * 24, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))

    path = save_compressed(cnn(64), tmp_path / "cnn.safetensors")
    model = cnn(32)
    with pytest.raises(ValueError) as err:
        load_compressed(model, path)
    message = str(err.value)
    assert message.startswith("Expected argument `model` to be a model with the tensors stored in the file, of the "
                              "same shapes, but got 'Sequential'")
    assert ("HINT: shapes differ (file vs model): `3.weight` [64, 4608] vs [32, 4608], `3.bias` [64] vs [32], "
            "`5.weight` [10, 64] vs [10, 32]") in message
    assert "missing from the file" not in message and "not in the model" not in message  # nothing empty is listed
    shorter = nn.Sequential(*list(cnn(32))[:4])  # fewer tensors and other shapes
    with pytest.raises(ValueError, match=r"shapes differ \(file vs model\): `3\.weight` \[64, 4608\] vs \[32, 4608\], "
                                         r"`3\.bias` \[64\] vs \[32\]; not in the model: \['5\.bias', '5\.weight'\]"):
        load_compressed(shorter, path)
