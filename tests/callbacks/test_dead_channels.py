"""`Pruning(remove_channels=True)` with unstructured pruning: neurons it zeroed entirely are removed at the end of
the fit, and the smaller model computes what the masked one computed."""

from __future__ import annotations

import pytest
import torch

from litcompress import Pruning
from tests.helpers import fit
from tests.models import ZOO

pytest.importorskip("torch_pruning")


def rows_first(name, weight):
    """Scores that rank whole rows: unstructured pruning at 50% zeroes the first half of the rows entirely."""
    return torch.arange(weight.shape[0], dtype=weight.dtype)[:, None].expand_as(weight) + 1e-3 * weight.abs()


def _fit(tmp_path, remove):
    pruning = Pruning(0.5, importance=rows_first, start=0, end=1, exclude="<last>", remove_channels=remove,
                      verbose=False)
    _, module = fit(tmp_path, [pruning], model="mlp", max_epochs=2)
    return pruning, module.model


def test_dead_neurons_are_removed_and_outputs_kept(tmp_path):
    _, masked = _fit(tmp_path / "a", remove=False)
    pruning, removed = _fit(tmp_path / "b", remove=True)
    assert pruning.removed == {"model.net.0": (32, 16), "model.net.2": (32, 16)}
    assert [m.out_features for m in removed.net if hasattr(m, "out_features")] == [16, 16, 4]
    x = ZOO["mlp"].data().tensors[0][:16]
    masked.eval(), removed.eval()
    assert torch.allclose(masked(x), removed(x), atol=1e-5)
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in masked.parameters())


def test_remove_channels_defaults_off_for_unstructured_patterns(tmp_path):
    pruning = Pruning(0.5, importance=rows_first, start=0, end=1, exclude="<last>", verbose=False)
    _, model = fit(tmp_path, [pruning], model="mlp", max_epochs=2)
    assert not pruning.removed and model.model.net[0].out_features == 32


def test_an_untraceable_model_is_refused_before_the_first_step(tmp_path):
    from tests.models import LitClassifier
    from tests.sparsity.test_channels import Untraceable

    module = LitClassifier(Untraceable())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="Torch-Pruning can trace"):
        fit(tmp_path, [Pruning(0.5, remove_channels=True, verbose=False)], module=module)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # not one step was taken
