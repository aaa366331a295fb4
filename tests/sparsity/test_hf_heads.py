"""Whole attention heads of Hugging Face blocks (BERT-style, Llama-style with grouped-query attention, GPT-2's packed
`c_attn`) pruned by
`ChannelPruning` and removed: the smaller model computes what the masked one computed.

The weights are drawn with a large `initializer_range` so that attention is far from uniform: with the tiny default
initialisation every head attends almost uniformly, and a removal that regroups channels into the wrong heads would
still look exact."""

from __future__ import annotations

import pytest
import torch

from litcompress import ChannelPruning
from litcompress.sparsity.channels import ChannelPruner
from litcompress.sparsity.hf_heads import find_attention
from litcompress.structure import match_structure_
from tests.test_hf_models import VOCAB, LitHF, fit

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")


def bert(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, initializer_range=0.5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.5))


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.5, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))


def tokens(n: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=x).logits


def test_bert_heads_are_one_group_per_block_and_removal_is_exact():
    model = bert()
    x = tokens()
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    pruner = ChannelPruner(model, {"input_ids": x}, layers, sparsity=0.5)
    heads = {g.name: g.channels for g in pruner.groups if g.name.endswith("attention.self")}
    assert heads == {f"bert.encoder.layer.{i}.attention.self": 4 for i in range(2)}
    # query / key / value / output rows are never pruned channel by channel
    assert not any(g.name.endswith(("query", "key", "value")) for g in pruner.groups)
    pruner.update(1.0)
    masked = logits(model, x)
    pruner.remove()
    for i in range(2):
        attn = model.bert.encoder.layer[i].attention
        assert attn.self.query.out_features == attn.self.value.out_features == attn.output.dense.in_features == 16
        assert attn.self.num_attention_heads == 2 and attn.self.all_head_size == 16
    assert torch.allclose(logits(model, x), masked, atol=1e-5)


def test_llama_grouped_query_heads_go_with_their_key_value_head():
    model = llama()
    x = tokens()
    blocks = find_attention(model)
    block = blocks["model.layers.0.self_attn"]
    assert (block.heads, block.kv_heads, block.units, block.why_not()) == (4, 2, 2, None)
    dense = logits(model, x)
    keep = torch.tensor([False, True])
    with torch.no_grad():
        for s in block.slices():
            s.tensor.index_fill_(s.dim, s.index[~keep[s.root]], 0.0)
    masked = logits(model, x)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the pruned heads mattered
    block.remove(keep)
    assert (block.q.out_features, block.k.out_features, block.o.in_features) == (16, 8, 16)
    assert torch.allclose(logits(model, x), masked, atol=1e-5)
    fresh = llama()  # loading for inference: layers resized to the saved shapes first
    state = model.state_dict()
    match_structure_(fresh, state)
    fresh.load_state_dict(state)
    assert torch.allclose(logits(fresh, x), masked, atol=1e-5)


def test_gpt2_packed_heads_are_cut_from_c_attn_and_a_fresh_model_loads_them():
    model = gpt2()
    x = tokens()
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    pruner = ChannelPruner(model, {"input_ids": x}, layers, sparsity=0.5)
    assert {g.name: g.channels for g in pruner.groups if g.name.endswith("attn")} == {
        "transformer.h.0.attn": 4, "transformer.h.1.attn": 4}
    pruner.update(1.0)
    masked = logits(model, x)
    pruner.remove()
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (32, 48) and attn.split_size == 16 and attn.num_heads == 2
    assert torch.allclose(logits(model, x), masked, atol=1e-5)
    fresh = gpt2()
    state = model.state_dict()
    match_structure_(fresh, state)  # the split width follows the resized c_attn
    fresh.load_state_dict(state)
    assert fresh.transformer.h[1].attn.split_size == 16
    assert torch.allclose(logits(fresh, x), masked, atol=1e-5)


def test_heads_that_cannot_go_are_named():
    block = find_attention(llama())["model.layers.0.self_attn"]
    block.head_dim = 5
    assert "whole heads of size 5" in block.why_not()


BUILD = {"bert": bert, "llama": llama, "gpt2": gpt2}


def _fit(tmp_path, kind, **kwargs) -> LitHF:
    pruning = ChannelPruning(0.5, start=0, end=1, verbose=False, **kwargs)
    return fit(tmp_path, kind, [pruning], module=LitHF(BUILD[kind]()), steps=4)


def _widths(model: torch.nn.Module, kind: str) -> tuple[int, int]:
    """(width of the first block's heads, or key/value heads; width of its MLP's hidden layer)."""
    if kind == "bert":
        layer = model.bert.encoder.layer[0]
        return layer.attention.self.query.out_features, layer.intermediate.dense.out_features
    if kind == "gpt2":
        block = model.transformer.h[0]
        return block.attn.c_proj.weight.shape[0], block.mlp.c_fc.weight.shape[1]  # Conv1D: weight (in, out)
    layer = model.model.layers[0]
    return layer.self_attn.k_proj.out_features, layer.mlp.gate_proj.out_features


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_fit_removes_half_the_heads_and_computes_what_the_masked_model_did(tmp_path, kind):
    masked = _fit(tmp_path / "masked", kind, remove_channels=False)
    removed = _fit(tmp_path / "removed", kind)
    x = tokens(8)
    (heads, mlp), (full_heads, full_mlp) = _widths(removed.model, kind), _widths(masked.model, kind)
    assert heads * 2 == full_heads  # half the (key/value) heads
    assert mlp * 2 == full_mlp  # and half the MLP neurons
    expected = logits(masked.model, x)
    scale = float(expected.abs().max())  # logits of order 10: float32 sums differ in the 6th digit
    assert torch.allclose(logits(removed.model, x), expected, rtol=0, atol=2e-6 * scale)


def test_bert_heads_removed_mid_fit_keep_training(tmp_path):
    pruning = ChannelPruning(0.5, interval="step", start=0, end=2, remove_at=2, verbose=False)
    module = fit(tmp_path, "bert", [pruning], module=LitHF(bert()), steps=4)
    query = module.model.bert.encoder.layer[0].attention.self.query
    assert query.out_features == 16 and pruning.removed
    held = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.model.parameters()} == held  # the optimizer trains the smaller tensors
    state = module.trainer.optimizers[0].state[query.weight]
    assert state["exp_avg"].shape == query.weight.shape and int(state["step"]) == 4  # Adam state carried over


def test_gpt2_dead_neurons_and_a_dead_head_are_removed_exactly():
    from litcompress.sparsity.dead import DeadChannels

    model, x = gpt2(), tokens()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, [3, 5]] = 0  # two neurons whose output is the constant gelu(bias)
        attn = model.transformer.h[1].attn
        for part in range(3):  # head 1's query, key and value columns, and its rows of c_proj
            attn.c_attn.weight[:, part * 32 + 8: part * 32 + 16] = 0
        attn.c_proj.weight[8:16] = 0
    before = logits(model, x)
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    dead = DeadChannels(ChannelPruner(model, {"input_ids": x}, layers, 0.0), {"input_ids": x})
    assert dead.remove() == {"transformer.h.0.mlp.c_fc": (128, 126), "transformer.h.1.attn": (4, 3)}
    assert torch.allclose(logits(model, x), before, atol=1e-5)  # the neurons' constants folded into c_proj's bias


def test_attention_of_an_unknown_layout_keeps_its_channels_and_says_why():
    """OPT's attention (q/k/v/out_proj, `num_heads`) is not a layout litcompress knows: pruning its channels one by
    one made the model fail after removal ("shape '[2, -1, 4, 8]' is invalid"); now they stay, and the MLP shrinks."""
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32, init_std=0.5)).eval()
    x = tokens()
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    pruner = ChannelPruner(model, {"input_ids": x}, layers, sparsity=0.5)
    assert [g.name for g in pruner.groups] == ["model.decoder.layers.0.fc1"]
    assert "OPTAttention (with `num_heads`) looks like attention" in pruner.skipped["model.decoder.layers.0.self_attn"]
    pruner.update(1.0)
    masked = logits(model, x)
    pruner.remove()
    assert model.model.decoder.layers[0].fc1.out_features == 32
    assert torch.allclose(logits(model, x), masked, atol=1e-5)
