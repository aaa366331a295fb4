"""Channel pruning in pure torch: coupled channels are masked together, and removing them gives a smaller ordinary
module computing what the masked one did."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litcompress.sparsity.channels import ChannelPruner
from tests.models import MLP, ConvNet, TransformerClassifier

pytest.importorskip("torch_pruning")

CASES = {
    "mlp": (MLP, lambda: torch.randn(4, 16), ["net.0", "net.2"]),
    "cnn": (ConvNet, lambda: torch.randn(4, 1, 8, 8), ["stem.0", "block.0", "block.3"]),
    "transformer": (TransformerClassifier, lambda: torch.randn(4, 6, 8),
                    ["blocks.0.mlp.0", "blocks.1.mlp.0"]),
}


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("importance", ["magnitude", "l1", "bn_scale", "taylor"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_model_equals_the_removed_model(case, importance):
    build, data, layers = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = data()
    if importance == "bn_scale" and case != "cnn":  # refused when built, before any training step
        with pytest.raises(ValueError, match=r"bn_scale.*has no BatchNorm"):
            ChannelPruner(model, x, layers, sparsity=0.5, importance=importance)
        return
    pruner = ChannelPruner(model, x, layers, sparsity=0.5, importance=importance)
    assert pruner.groups and not pruner.skipped
    if importance == "taylor":
        model(x).square().mean().backward()
        pruner.accumulate()
    per_group = pruner.update(1.0)
    assert all(v == pytest.approx(0.5) for v in per_group.values())
    masked = model(x)
    before = _params(model)
    shapes = pruner.remove()
    after = model(x)
    assert torch.allclose(masked, after, atol=1e-5), (masked - after).abs().max()
    assert _params(model) < before
    assert all(kept == total // 2 for total, kept in shapes.values())
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules() if m is not model
               and not isinstance(m, type(model)) and type(m).__module__ != "tests.models")


def test_coupled_residual_channels_are_one_group_and_the_output_layer_is_never_pruned():
    torch.manual_seed(0)
    model = ConvNet().eval()
    pruner = ChannelPruner(model, torch.randn(2, 1, 8, 8), ["stem.0", "block.0", "block.3", "head"], 0.5)
    names = sorted(g.name for g in pruner.groups)
    assert names == ["block.0", "stem.0"]  # stem.0 and block.3 share the residual channels; the head is an output
    pruner.update(1.0)
    pruner.remove()
    assert model.stem[0].out_channels == model.block[3].out_channels == model.block[0].in_channels == 4
    assert model.head.out_features == 4 and model.head.in_features == 16


def test_schedule_never_revives_a_channel_and_masks_hold_after_a_step():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(8, 16)
    pruner = ChannelPruner(model, x, ["net.0"], sparsity=0.75)
    pruner.update(0.5)
    first = pruner.groups[0].mask.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    pruner.apply()
    assert (model.net[0].weight[~first] == 0).all() and (model.net[0].bias[~first] == 0).all()
    assert (model.net[2].weight[:, ~first] == 0).all()
    with torch.no_grad():
        model.net[0].weight.mul_(-1)  # reorder magnitudes: pruned channels must stay pruned
    pruner.update(1.0)
    assert not (pruner.groups[0].mask & ~first).any()
    assert int(pruner.groups[0].mask.sum()) == 8


def test_state_round_trip_and_bad_state():
    torch.manual_seed(0)
    model = MLP()
    pruner = ChannelPruner(model, torch.randn(2, 16), ["net.0", "net.2"], 0.5)
    pruner.update(1.0)
    other = ChannelPruner(MLP(), torch.randn(2, 16), ["net.0", "net.2"], 0.5)
    other.load_state_dict(pruner.state_dict())
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(pruner.groups, other.groups))
    with pytest.raises(ValueError, match="`state_dict`"):
        other.load_state_dict({"masks": {"net.0": torch.ones(3, dtype=torch.bool)}})


def test_layernorm_coupled_channels_are_skipped_with_a_reason():
    torch.manual_seed(0)
    model = TransformerClassifier().eval()
    pruner = ChannelPruner(model, torch.randn(2, 6, 8), ["proj", "blocks.0.mlp.0"], 0.5)
    assert [g.name for g in pruner.groups] == ["blocks.0.mlp.0"]
    assert "proj" in pruner.skipped


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(sparsity=1.0), "`sparsity`"),
    (dict(importance="movement"), "`importance`"),
    (dict(layers=["nope"]), "`layers`"),
])
def test_bad_arguments(kwargs, match):
    args = dict(model=MLP(), example_input=torch.randn(2, 16), layers=["net.0"], sparsity=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        ChannelPruner(**args)


def test_depthwise_convolution_is_pruned_with_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = ChannelPruner(model, x, ["0"], 0.5)
    pruner.update(1.0)
    masked = model(x)
    pruner.remove()
    assert model[1].groups == model[1].out_channels == 4
    assert torch.allclose(masked, model(x), atol=1e-5)


def test_hugging_face_conv1d_neurons_are_pruned_and_removed():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.GELU(), Conv1D(4, 16)).eval()  # Conv1D(out, in)
    x = torch.randn(3, 8)
    pruner = ChannelPruner(model, x, ["0"], 0.5)
    pruner.update(1.0)
    masked = model(x)
    pruner.remove()
    assert model[0].weight.shape == (8, 8) and model[0].nf == 8 and model[2].weight.shape == (8, 4)
    assert torch.allclose(masked, model(x), atol=1e-6)


class Untraceable(nn.Module):
    """Splits a layer's output and concatenates the halves transposed: Torch-Pruning cannot map those channels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).unsqueeze(1).split(8, dim=2)  # (B, 1, 8) each
        return self.out(torch.cat([a.transpose(1, 2), b.transpose(1, 2)], dim=1).transpose(1, 2).squeeze(1))


def test_a_model_torch_pruning_cannot_trace_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`model`.*Torch-Pruning can trace.*unstructured or N:M"):
        ChannelPruner(Untraceable(), torch.randn(2, 16), ["fc"], 0.5)
