"""Frozen tensors (`requires_grad=False`) are never pruned by default, and a gradient-based importance refuses
them when they are named."""

from __future__ import annotations

import logging

import pytest
import torch

from litcompress import Pruning
from tests.helpers import fit
from tests.models import MLP, LitClassifier


def _frozen_mlp():
    torch.manual_seed(0)
    model = MLP()
    model.net[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("importance", ["magnitude", "movement", "taylor"])
def test_default_selection_leaves_frozen_tensors_out(tmp_path, importance, caplog):
    model = _frozen_mlp()
    frozen = model.net[0].weight.detach().clone()
    pruning = Pruning(0.5, importance=importance, start=1, end=2)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [pruning], module=LitClassifier(model), max_epochs=3)
    assert torch.equal(model.net[0].weight, frozen)  # untouched: not one weight zeroed
    assert pruning.pruner is not None and [r.name for r in pruning.pruner.refs] == ["model.net.2.weight",
                                                                                   "model.net.4.weight"]
    pruned = torch.cat([model.net[2].weight.flatten(), model.net[4].weight.flatten()])
    assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert "left out 1 frozen tensor(s) (requires_grad=False): model.net.0.weight" in caplog.text


def test_a_frozen_tensor_named_explicitly_is_pruned_by_magnitude(tmp_path):
    model = _frozen_mlp()
    fit(tmp_path, [Pruning(0.5, parameters=r"net\.0\.weight", verbose=False)], module=LitClassifier(model))
    assert (model.net[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_an_all_frozen_model_is_an_error(tmp_path):
    model = _frozen_mlp().requires_grad_(False)
    model.net[4].bias.requires_grad_(True)  # something to train, nothing to prune
    with pytest.raises(ValueError, match=r"`model`.*only frozen ones"):
        fit(tmp_path, [Pruning(0.5)], module=LitClassifier(model))
