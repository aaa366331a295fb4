"""The pure-torch Pruner, in a plain training loop with no Lightning."""

import pytest
import torch
import torch.nn.functional as F

from litcompress.selection import select_parameters
from litcompress.sparsity import Pruner, check_nm
from tests.models import MLP, classification_data


def train_loop(pruner: Pruner, model, steps=20, update_every=5, final=1.0):
    data = classification_data((16,), n=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.tensors
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()
        opt.step()
        pruner.apply()
        if (step + 1) % update_every == 0:
            pruner.update(final * (step + 1) / steps)


@pytest.mark.parametrize("importance", ["magnitude", "movement", "taylor", "random"])
def test_plain_torch_loop_reaches_targets_and_keeps_zeros(importance):
    torch.manual_seed(0)
    model = MLP()
    pruner = Pruner(select_parameters(model), sparsity=0.8, scope="layer", importance=importance)
    train_loop(pruner, model)
    for ref in pruner.refs:
        w = ref.tensor
        assert int((w == 0).sum()) == round(0.8 * w.numel())
        assert torch.equal(w == 0, ~pruner.masks[ref.name])
    assert pruner.global_sparsity() == pytest.approx(0.8, abs=1 / 512)


def test_movement_prunes_weights_moving_to_zero_not_smallest():
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    b.load_state_dict(a.state_dict())
    pa = Pruner(select_parameters(a), 0.5, scope="layer", importance="magnitude")
    pb = Pruner(select_parameters(b), 0.5, scope="layer", importance="movement")
    train_loop(pa, a)
    train_loop(pb, b)
    assert not torch.equal(pa.masks["net.0.weight"], pb.masks["net.0.weight"])


def test_global_scope_counts_all_tensors_once():
    model = MLP()
    pruner = Pruner(select_parameters(model), 0.7, scope="global")
    per_tensor = pruner.update(1.0)
    total = sum(r.tensor.numel() for r in pruner.refs)
    zeros = sum(int((r.tensor == 0).sum()) for r in pruner.refs)
    assert zeros == round(0.7 * total)
    assert len(set(per_tensor.values())) > 1  # one threshold, different per-tensor sparsities


def test_dict_targets_first_match_wins_unmatched_stay_dense():
    model = MLP()
    pruner = Pruner(select_parameters(model), {r"net\.0": 0.25, r"net\.[02]": 0.5})
    assert pruner.update(1.0) == {"net.0.weight": 0.25, "net.2.weight": 0.5}
    assert int((model.net[4].weight == 0).sum()) == 0


def test_nm_pruner_and_state_roundtrip():
    model = MLP()
    pruner = Pruner(select_parameters(model, exclude="<last>"), None, pattern="2:4")
    pruner.update(1.0)
    assert all(check_nm(r.tensor, 2, 4) for r in pruner.refs)
    clone = MLP()
    clone.load_state_dict(model.state_dict())
    restored = Pruner(select_parameters(clone, exclude="<last>"), None, pattern="2:4")
    restored.load_state_dict(pruner.state_dict())
    assert all(torch.equal(restored.masks[n], pruner.masks[n]) for n in pruner.masks)


def test_pruner_errors():
    model = MLP()
    refs = select_parameters(model)
    with pytest.raises(ValueError, match="M divides the input size"):
        Pruner(refs, None, pattern="2:3")  # 16 inputs are not groups of 3
    with pytest.raises(ValueError, match="`importance`"):
        Pruner(refs, 0.5, scope="layer", importance="size")
    with pytest.raises(ValueError, match="`scope`"):
        Pruner(refs, 0.5, scope="model")
    with pytest.raises(ValueError, match="patterns that each match"):
        Pruner(refs, {"nope": 0.5})
    bad = Pruner(refs, 0.5, scope="layer", importance=lambda name, w: torch.ones(3))
    with pytest.raises(ValueError, match="tensor of shape"):
        bad.update(1.0)
    pruner = Pruner(refs, 0.5, scope="layer")
    pruner.update(1.0)
    other = Pruner(select_parameters(MLP(hidden=8)), 0.5)
    with pytest.raises(ValueError, match="written for a different model"):
        other.load_state_dict(pruner.state_dict())
