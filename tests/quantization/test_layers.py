import copy
import pickle

import pytest
import torch
from torch import nn

from litcompress.quantization.functional import fake_quantize, signed_range, symmetric_scale
from litcompress.quantization.layers import convert_, revert_
from litcompress.quantization.quantizers import QuantConfig
from tests.models import ZOO


def identity_quantizers(module):
    module.weight_quantizers, module.input_quantizers, module.fake_quant_enabled = {}, {}, True


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal-bool", "float", "padding", "both"])
@pytest.mark.parametrize("separate", [False, True])
def test_attention_reimplementation_matches_torch(batch_first, need_weights, masks, separate):
    torch.manual_seed(0)
    kwargs = dict(kdim=6, vdim=5) if separate else {}
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs).eval()
    mine = copy.deepcopy(ref)
    convert_(mine, QuantConfig(), [""])
    identity_quantizers(mine)
    n, t, s = 3, 4, 4
    q = torch.randn(n, t, 8) if batch_first else torch.randn(t, n, 8)
    k = torch.randn(n, s, 6 if separate else 8) if batch_first else torch.randn(s, n, 6 if separate else 8)
    v = torch.randn(n, s, 5 if separate else 8) if batch_first else torch.randn(s, n, 5 if separate else 8)
    if not separate:
        k = v = q
    attn_mask = {"causal-bool": torch.ones(t, s, dtype=torch.bool).triu(1), "float": torch.randn(t, s),
                 "both": torch.ones(t, s, dtype=torch.bool).triu(1)}.get(masks)
    padding = torch.tensor([[False] * (s - 1) + [True]] * n) if masks in ("padding", "both") else None
    a = ref(q, k, v, key_padding_mask=padding, need_weights=need_weights, attn_mask=attn_mask)
    b = mine(q, k, v, key_padding_mask=padding, need_weights=need_weights, attn_mask=attn_mask)
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_convert_keeps_parameters_and_keys_and_reverts(name):
    model = ZOO[name].build()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    layers = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Embedding, nn.LSTM, nn.GRU,
                                                                 nn.MultiheadAttention)]
    converted = convert_(model, QuantConfig(), layers)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    for module in converted.values():
        module.fake_quant_enabled = True
        for q in module.input_quantizers.values():  # give activations a range
            q.lo, q.hi = torch.tensor(-4.0), torch.tensor(4.0)
    model.eval()
    x = ZOO[name].data().tensors[0][:4]
    out = model(x)
    assert torch.isfinite(out).all()
    for module in converted.values():
        revert_(module)
    assert not any(type(m).__name__.startswith("QAT") for m in model.modules())


def test_weight_grid_is_integer_multiple_of_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    for bits in (2, 4, 8):
        qmin, qmax = signed_range(bits)
        scale = symmetric_scale(w, qmax, axis=0)
        wq = fake_quantize(w, scale, torch.zeros(6, dtype=torch.int32), qmin, qmax, axis=0)
        ints = wq / scale[:, None]
        assert torch.allclose(ints, ints.round(), atol=1e-4)
        assert ints.abs().max() <= qmax + 1e-4
        assert (wq[w == 0] == 0).all()


def test_straight_through_gradient_is_zero_outside_range():
    x = torch.tensor([-3.0, 0.1, 0.2, 3.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.01), torch.tensor(128), 0, 255).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_matches_aten_fake_quant_up_to_one_step():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    ours = fake_quantize(x, torch.tensor(0.037), torch.tensor(100), 0, 255)
    aten = torch.fake_quantize_per_tensor_affine(x, 0.037, 100, 0, 255)
    assert (ours - aten).abs().max() <= 0.037 + 1e-6
    assert (ours != aten).float().mean() < 0.01


def test_hf_conv1d_converts_in_place_runs_its_own_forward_and_quantizes_output_columns():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    layer = transformers.pytorch_utils.Conv1D(6, 4)  # weight (4 inputs, 6 outputs)
    model = nn.Sequential(layer)
    x = torch.randn(2, 3, 4)
    expected = model(x)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert convert_(model, QuantConfig(activation_bits=None), ["0"]) == {"0": layer}
    assert type(layer).__name__ == "QATConv1D" and repr(layer) == "QATConv1D(nf=6, nx=4)"
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    assert torch.equal(model(x), expected)  # fake quantization off: the original forward, bit for bit
    q = layer.weight_quantizers["weight"]
    layer.fake_quant_enabled = True
    w = q(layer.weight).detach()
    scale = q.current_scale(layer.weight)
    assert q.axis == 1 and scale.shape == (6,)  # per output channel: the columns
    ints = w / scale  # broadcasts along the last dimension: one scale per column
    assert torch.allclose(ints, ints.round(), atol=1e-4) and int(ints.round().abs().amax(0).min()) == q.qmax
    assert torch.equal(model(x), torch.addmm(layer.bias, x.reshape(-1, 4), w).view(2, 3, 6))
    assert torch.equal(q.integers(layer.weight)[0].float() * scale, w)
    restored = pickle.loads(pickle.dumps(model))  # the converted class pickles as the others do
    assert torch.equal(restored(x), model(x))
    revert_(layer)
    assert type(layer) is transformers.pytorch_utils.Conv1D and torch.equal(model(x), expected)


def test_tied_weight_gets_one_quantizer_in_every_owner():
    model = ZOO["gpt"].build()  # tok (Embedding) and lm_head (Linear) share one weight
    convert_(model, QuantConfig(), ["tok", "lm_head"])
    assert model.lm_head.weight_quantizers["weight"] is model.tok.weight_quantizers["weight"]
    later = ZOO["gpt"].build()
    convert_(later, QuantConfig(), ["tok"])
    convert_(later, QuantConfig(), ["lm_head"])  # converted afterwards: it reuses the other owner's quantizer
    assert later.lm_head.weight_quantizers["weight"] is later.tok.weight_quantizers["weight"]


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("scale", ["minmax", "power_of_two"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_embedding_quantizes_only_the_rows_it_looks_up_with_identical_results(granularity, scale, frozen):
    """GPT-2's 50,257-row embedding is read 128 rows at a time: quantizing only those is the same lookup."""
    from litcompress.quantization import QuantConfig, convert_

    torch.manual_seed(0)
    fast, full = nn.Embedding(50, 8), nn.Embedding(50, 8)
    full.load_state_dict(fast.state_dict())
    config = QuantConfig(weight_granularity=granularity, scale=scale, weight_bits=4)
    for e in (fast, full):
        convert_(nn.Sequential(e), config, ["0"])
        e.fake_quant_enabled = True
        if frozen:
            e.weight_quantizers["weight"].freeze(e.weight)
    x = torch.randint(0, 50, (3, 5))
    a = fast(x)
    b = torch.nn.functional.embedding(x, full.weight_quantizers["weight"](full.weight))  # the whole-tensor path
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.equal(a, b) and torch.equal(fast.weight.grad, full.weight.grad)
