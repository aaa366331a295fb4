"""Whole attention heads: masked heads contribute nothing, and the layer without them computes the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litcompress.sparsity.heads import PrunedMultiheadAttention, head_slices, remove_heads
from litcompress.structure import match_structure_
from tests.models import ZOO


def _mask_heads(attn, heads):
    with torch.no_grad():
        for s in head_slices(attn):
            index = s.index[torch.isin(s.root, torch.tensor(heads))]
            s.tensor.index_fill_(s.dim, index, 0.0)


def _keep(n, dropped):
    keep = torch.ones(n, dtype=torch.bool)
    keep[dropped] = False
    return keep


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("need_weights", [True, False])
def test_pruned_attention_equals_the_masked_layer(batch_first, kdim, need_weights):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(12, 4, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    nn.init.normal_(attn.in_proj_bias) if attn.in_proj_bias is not None else None
    shape = (3, 5) if batch_first else (5, 3)
    q = torch.randn(*shape, 12)
    kv = torch.randn(*(shape[0], 7) if batch_first else (7, shape[1]), kdim or 12)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    mask = torch.randn(3 * 4, 5, 7)  # per original head
    _mask_heads(attn, [1, 3])
    expected, expected_w = attn(q, kv, kv, key_padding_mask=padding, attn_mask=mask, need_weights=need_weights)
    ref = attn(q, kv, kv, key_padding_mask=padding, attn_mask=mask, average_attn_weights=False)[1]
    smaller = remove_heads(attn, _keep(4, [1, 3]))  # takes over attn's out_proj: attn is spent
    assert smaller.num_heads == 2 and smaller.kept_heads.tolist() == [0, 2]
    out, weights = smaller(q, kv, kv, key_padding_mask=padding, attn_mask=mask, need_weights=need_weights)
    assert torch.allclose(out, expected, atol=1e-5)
    if need_weights:  # masked heads still have attention weights (uniform over keys); the others agree
        per_head = smaller(q, kv, kv, key_padding_mask=padding, attn_mask=mask, average_attn_weights=False)[1]
        assert torch.allclose(per_head, ref[:, [0, 2]], atol=1e-5)
    else:
        assert weights is None and expected_w is None


def test_causal_and_unbatched_inputs():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    _mask_heads(attn, [0])
    x = torch.randn(6, 8)  # unbatched (L, E)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    xb = x[None]
    expected, expected_b = attn(x, x, x, attn_mask=causal)[0], attn(xb, xb, xb, attn_mask=causal)[0]
    smaller = remove_heads(attn, _keep(2, [0]))
    assert torch.allclose(smaller(x, x, x, attn_mask=causal)[0], expected, atol=1e-5)
    assert torch.allclose(smaller(xb, xb, xb, is_causal=True, need_weights=False)[0], expected_b, atol=1e-5)


def test_heads_are_groups_of_the_channel_pruner_and_removed():
    pytest.importorskip("torch_pruning")
    from litcompress.sparsity.channels import ChannelPruner

    torch.manual_seed(0)
    model = ZOO["transformer"].build().eval()  # two blocks, 2 heads of 8
    x = ZOO["transformer"].data().tensors[0][:4]
    pruner = ChannelPruner(model, x, ["blocks.0.attn", "blocks.1.attn", "blocks.0.mlp.0"], sparsity=0.5)
    names = [g.name for g in pruner.groups]
    assert "blocks.0.attn" in names and "blocks.1.attn" in names and "blocks.0.mlp.0" in names
    assert pruner.update(1.0)["blocks.0.attn"] == 0.5
    masked = model(x)
    kept = pruner.kept_positions()
    pruner.remove()
    attn = model.blocks[0].attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 1
    assert attn.in_proj_weight.shape == (3 * 8, 16) and attn.out_proj.weight.shape == (16, 8)
    assert kept[(attn.out_proj, "weight")][1].numel() == 8  # the same out_proj module, narrowed
    assert torch.allclose(model(x), masked, atol=1e-5)
    fresh = ZOO["transformer"].build()
    assert "blocks.0.attn" in match_structure_(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))


@pytest.mark.parametrize(("make", "why"), [
    (lambda: nn.MultiheadAttention(8, 1, batch_first=True), "one head"),
    (lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True), "add_bias_kv"),
])
def test_attention_that_keeps_its_heads_says_why(make, why):
    pytest.importorskip("torch_pruning")
    from litcompress.sparsity.channels import ChannelPruner

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = make(), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    pruner = ChannelPruner(Net(), torch.randn(2, 3, 8), ["attn"], sparsity=0.5)
    assert why in pruner.skipped["attn"]
