"""A freshly built model reshaped to a smaller saved structure loads its weights and computes what it computed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from litcompress.factorization import factorize_
from litcompress.structure import match_structure_
from tests.models import ZOO


def test_channel_removed_cnn_loads_into_a_fresh_one():
    pytest.importorskip("torch_pruning")
    from litcompress.sparsity.channels import ChannelPruner

    torch.manual_seed(0)
    model = ZOO["cnn"].build().eval()
    x = ZOO["cnn"].data().tensors[0][:8]
    pruner = ChannelPruner(model, x, ["stem.0", "block.0"], sparsity=0.5)
    pruner.update(1.0)
    pruner.remove()
    fresh = ZOO["cnn"].build().eval()
    changed = match_structure_(fresh, model.state_dict())
    assert "stem.0" in changed and "stem.1" in changed
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    assert fresh.stem[1].num_features == model.stem[1].num_features


def test_factorized_layers_are_rebuilt_at_the_saved_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 8, 1))
    factorize_(model, ["0"], rank=3)
    factorize_(model, ["2"], rank=2)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 8, 1))
    assert match_structure_(fresh, model.state_dict()) == ["0", "2"]
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(fresh[0](x), model[0](x)) and fresh[2].rank == 2


def test_an_unknown_layer_with_other_shapes_is_named():
    class Odd(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(n))

    saved = Odd(3).state_dict()
    with pytest.raises(ValueError, match=r"table.*Odd"):
        match_structure_(Odd(5), saved)


def test_matching_shapes_change_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    params = [id(p) for p in model.parameters()]
    assert match_structure_(model, copy.deepcopy(model).state_dict()) == []
    assert [id(p) for p in model.parameters()] == params
