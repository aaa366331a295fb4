"""Batches and model outputs in pure torch: dicts, ModelOutput-like objects, label alignment, position masks, and the
feature widths of transformer blocks."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from litcompress._calls import call_model
from litcompress.distillation.batches import (
    accepts_keyword,
    aligned_targets,
    is_causal_lm,
    output_logits,
    output_loss,
    position_mask,
    split_batch,
    targets_and_mask,
)
from litcompress.distillation.features import capture, make_adapter, output_width


def test_split_batch_and_call_model():
    ids, mask, labels = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long)
    inputs, targets = split_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert list(inputs) == ["input_ids", "attention_mask"] and targets is labels
    assert split_batch([ids]) == (ids, None) and split_batch(ids) == (ids, None)

    class Keywords(nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids * attention_mask

    assert torch.equal(call_model(Keywords(), inputs), ids * mask)


def test_outputs_give_their_logits_and_loss():
    logits, loss = torch.randn(2, 3), torch.tensor(1.5)
    model_output = OrderedDict(loss=loss, logits=logits)  # a ModelOutput is an OrderedDict with attributes
    for output in (logits, SimpleNamespace(logits=logits, loss=loss), model_output):
        assert output_logits(output) is logits
    assert output_loss(model_output) is loss and output_loss(SimpleNamespace(logits=logits, loss=None)) is None
    with pytest.raises(TypeError, match=r"returned a tuple, which is not a tensor and has no `logits` tensor in "
                                        r"`DistillationModule.logits`"):
        output_logits((logits,))


def test_keyword_and_causal_lm_detection():
    class Labels(nn.Module):
        def forward(self, x, labels=None):
            return x

    class Anything(nn.Module):
        def forward(self, **kwargs):
            return kwargs

    assert accepts_keyword(Labels(), "labels") and accepts_keyword(Anything(), "labels")
    assert not accepts_keyword(nn.Linear(2, 2), "labels")
    assert is_causal_lm(type("LlamaForCausalLM", (nn.Module,), {})())
    assert is_causal_lm(type("GPT2LMHeadModel", (nn.Module,), {})())
    assert not is_causal_lm(type("BertForMaskedLM", (nn.Module,), {})())


def test_alignment_and_masks():
    logits, labels = torch.zeros(2, 4, 5), torch.tensor([[1, 2, 3, -100], [-100, 5, 6, 7]])
    shifted = aligned_targets(logits, labels, shift=True)
    assert shifted.tolist() == [[2, 3, -100, -100], [5, 6, 7, -100]]
    assert aligned_targets(logits, labels, shift=False) is labels
    assert aligned_targets(torch.zeros(2, 5), torch.tensor([1, 2]), shift=True).tolist() == [1, 2]  # classification
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert position_mask(logits, labels, attention).tolist() == [[True, True, True, False], [False, True, True, True]]
    assert position_mask(logits, None, attention).tolist() == attention.bool().tolist()
    assert position_mask(torch.zeros(2, 5), torch.tensor([1, 2]), attention) is None
    assert position_mask(logits, None) is None
    aligned, mask = targets_and_mask(logits, labels, {"attention_mask": attention}, shift=True)
    assert aligned.tolist() == shifted.tolist()
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    aligned, _ = targets_and_mask(logits, labels, torch.zeros(2, 4), shift=True)
    assert aligned is labels  # tuple batches' targets are aligned with the outputs already


class Block(nn.Module):
    """A pre-norm transformer block returning a tuple, with a norm that is not torch's (as Llama's RMSNorm)."""

    def __init__(self, width):
        super().__init__()
        self.input_layernorm = type("TinyRMSNorm", (nn.Module,), {})()
        self.input_layernorm.weight = nn.Parameter(torch.ones(width))
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.mlp(x), None


def test_transformer_blocks_have_the_width_of_their_last_norm_and_give_their_hidden_state():
    assert output_width(Block(6)) == 6
    assert output_width(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3), nn.LayerNorm(3))) == 3
    assert output_width(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))) is None  # not a transformer block
    model = nn.Sequential(Block(6))
    x = torch.randn(2, 5, 6)
    with capture(model, ["0"]) as found:
        model(x)
    assert found["0"].shape == (2, 5, 6)

    class Wrapper(nn.Module):  # returns a ModelOutput-like mapping: its first tensor is captured
        def forward(self, x):
            return OrderedDict(last_hidden_state=x * 2, hidden_states=None)

    outer = nn.Sequential(Wrapper())
    with capture(outer, ["0"]) as found:
        outer(x)
    assert torch.equal(found["0"], x * 2)


def test_an_inferred_width_that_does_not_match_says_so():
    block = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))  # a head after the last norm
    adapter = make_adapter(output_width(block), 16)
    with pytest.raises(ValueError, match="a feature of width 3 reached an adapter made for width 8 in `features`"):
        adapter(block(torch.randn(2, 4)))
