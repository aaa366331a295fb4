"""`LowRankFactorization` with `Pruning` or `ChannelPruning` in the same fit, in both callback orders: at ``start=0``
the pruner prunes the factors (what it reports is what the model holds); a mid-fit factorization of layers a pruner
masks is refused before the first step, and layers kept out of one of the two compose."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litcompress import ChannelPruning, LowRankFactorization, Pruning
from litcompress.factorization import Factorized
from tests.helpers import fit
from tests.models import ZOO, LitClassifier

ORDERS = ["lowrank_first", "pruner_first"]


def _ordered(lowrank, pruner, order):
    return [lowrank, pruner] if order == "lowrank_first" else [pruner, lowrank]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2}


@pytest.mark.parametrize("order", ORDERS)
def test_pruning_prunes_the_factors_at_start_0(tmp_path, order):
    """The factors are what is pruned, and the zeros the callback reports are in the final model (before, with
    `Pruning` first its masks stayed on the replaced weights: 50% reported, 0% in the factors)."""
    lowrank = LowRankFactorization(rank=4, exclude="<last>", verbose=False)
    pruning = Pruning(0.5, schedule="one_shot")
    _, module = fit(tmp_path, _ordered(lowrank, pruning, order), max_epochs=2)
    assert isinstance(module.model.net[0], Factorized)
    assert pruning.pruner is not None
    names = {r.name for r in pruning.pruner.refs}
    assert {"model.net.0.first.weight", "model.net.0.second.weight", "model.net.2.first.weight"} <= names
    weights = _weights(module)
    assert names == set(weights)  # every weight of the model, none of them gone
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert pruning.pruner.global_sparsity() == pytest.approx(0.5, abs=0.01)
    assert zeros == pytest.approx(pruning.pruner.global_sparsity(), abs=1e-6)


class _Outputs(LowRankFactorization.__mro__[-2]):  # a plain Callback, placed before the pruner
    """The model's output on a fixed input when training ends, before the pruner removes its channels."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def on_train_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            self.masked = pl_module(self.x)


@pytest.mark.parametrize("order", ORDERS)
def test_channel_pruning_shrinks_the_factors_at_start_0(tmp_path, order):
    """Channels of the factors (the rank among them) are removed exactly: the smaller model computes what the masked
    one did, and the factorized layers' sizes follow."""
    pytest.importorskip("torch_pruning")
    x = torch.randn(8, 16)
    lowrank = LowRankFactorization(rank=4, exclude="<last>", verbose=False)
    pruning = ChannelPruning(0.5, schedule="one_shot", example_input=x[:4])
    outputs = _Outputs(x)
    _, module = fit(tmp_path, [outputs, *_ordered(lowrank, pruning, order)], max_epochs=2)
    first = module.model.net[0]
    assert isinstance(first, Factorized)
    assert pruning.removed["model.net.0.first"] == (4, 2) and pruning.removed["model.net.0.second"] == (32, 16)
    assert (first.rank, first.in_features, first.out_features) == (2, 16, 16)
    assert tuple(first.weight.shape) == (16, 16) and module.model.net[2].in_features == 16
    with torch.no_grad():
        assert torch.allclose(module(x), outputs.masked, atol=1e-5)


def _pruner(kind: str, **kwargs):
    if kind == "pruning":
        return Pruning(0.5, schedule="one_shot", **kwargs)
    pytest.importorskip("torch_pruning")
    return ChannelPruning(0.5, schedule="one_shot", example_input=torch.randn(4, 16), **kwargs)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["pruning", "channel"])
def test_mid_fit_factorization_of_pruned_layers_is_refused_before_the_first_step(tmp_path, kind, order):
    """Masks cannot follow a weight into its factors: refused, naming both callbacks, the layers and the fixes, and
    the model is left as it was given."""
    module = LitClassifier(ZOO["mlp"].build())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    lowrank = LowRankFactorization(rank=4, start=1, verbose=False)
    pruner = _pruner(kind)
    who = type(pruner).__name__
    match = (rf"`start` to be 0 when {who} prunes layers that LowRankFactorization replaces.*"
             rf"{who} masks the weights of model\.net\.0, model\.net\.2, which.*start=0.*exclude")
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, _ordered(lowrank, pruner, order), module=module, max_epochs=2)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["channel", "dead_channels"])
def test_removing_channels_of_a_layer_feeding_a_factorized_one_is_refused(tmp_path, kind, order):
    """Channels removed from `net.0` alone also cut the inputs of `net.2`: factorizing `net.2` mid-fit would leave
    its factors reading the old width."""
    pytest.importorskip("torch_pruning")
    lowrank = LowRankFactorization(rank=4, start=1, parameters=r"net\.2", verbose=False)
    if kind == "channel":
        pruner = ChannelPruning(0.5, schedule="one_shot", parameters=r"net\.0", example_input=torch.randn(4, 16))
    else:
        pruner = Pruning(0.5, schedule="one_shot", parameters=r"net\.0", remove_channels=True,
                         example_input=torch.randn(4, 16))
    who = type(pruner).__name__
    with pytest.raises(ValueError, match=rf"{who} masks the weights of model\.net\.2, which"):
        fit(tmp_path, _ordered(lowrank, pruner, order), max_epochs=2)


@pytest.mark.parametrize("order", ORDERS)
def test_a_layer_kept_dense_by_the_rank_may_be_pruned_mid_fit(tmp_path, order):
    """At rank 4 `net.4` (32 -> 4) stays dense (4 * 36 > 128), so pruning it composes with a later factorization of
    the others, and its zeros are in the final model."""
    lowrank = LowRankFactorization(rank=4, start=1, verbose=False)
    pruning = Pruning(0.5, schedule="one_shot", parameters=r"net\.4")
    _, module = fit(tmp_path, _ordered(lowrank, pruning, order), max_epochs=2)
    net = module.model.net
    assert isinstance(net[0], Factorized) and isinstance(net[2], Factorized) and isinstance(net[4], nn.Linear)
    assert not lowrank.results["model.net.4"].factorized
    assert int((net[4].weight == 0).sum()) == net[4].weight.numel() // 2


@pytest.mark.parametrize("order", ORDERS)
def test_channels_removed_before_the_factorization_compose(tmp_path, order):
    """`ChannelPruning(remove_at=1)` removes its channels at the step `LowRankFactorization(start=1)` factorizes:
    the factorization sees the smaller layers."""
    pytest.importorskip("torch_pruning")
    lowrank = LowRankFactorization(rank=2, start=1, exclude="<last>", verbose=False)
    pruner = ChannelPruning(0.5, schedule="one_shot", end=1, remove_at=1, example_input=torch.randn(4, 16))
    _, module = fit(tmp_path, _ordered(lowrank, pruner, order), max_epochs=2)
    assert pruner.removed["model.net.0"] == (32, 16)
    assert lowrank.results["model.net.0"].full_rank == 16 and module.model.net[0].out_features == 16


def test_a_pruner_that_keeps_its_selection_is_told_to_come_after(tmp_path):
    """A pruner placed before `LowRankFactorization(start=0)` that keeps the tensors it selected (as one that traced
    its dead channels under FSDP2 does) is refused with the order that works; the model is restored."""

    class KeepsSelection(Pruning):
        def setup(self, trainer, pl_module, stage):
            if self.pruner is None:
                super().setup(trainer, pl_module, stage)

    module = LitClassifier(ZOO["mlp"].build())
    lowrank = LowRankFactorization(rank=4, verbose=False)
    with pytest.raises(RuntimeError, match=r"place LowRankFactorization before KeepsSelection"):
        fit(tmp_path, [KeepsSelection(0.5), lowrank], module=module, max_epochs=1)
    assert not any(isinstance(m, Factorized) for m in module.modules())
