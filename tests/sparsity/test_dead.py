"""Dead channels (all-zero weights after unstructured pruning) removed exactly: constants folded into biases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.models import ZOO

pytest.importorskip("torch_pruning")

from litcompress.sparsity.channels import ChannelPruner
from litcompress.sparsity.dead import DeadChannels


def _remove(model, x, layers):
    model.eval()
    before = model(x)
    dead = DeadChannels(ChannelPruner(model, x, layers, sparsity=0.0), x)
    removed = dead.remove()
    return before, removed, dead


def test_mlp_neurons_with_a_bias_fold_into_the_next_layer():
    torch.manual_seed(0)
    model = ZOO["mlp"].build()  # 16 -> 32 -> 32 -> 4
    with torch.no_grad():
        model.net[0].weight[[1, 5, 7]] = 0
        model.net[0].bias[[1, 5, 7]] = torch.tensor([0.5, -0.3, 0.2])  # relu: 0.5, 0, 0.2 (constants)
        model.net[2].weight[:10] = 0
    x = torch.randn(32, 16)
    before, removed, dead = _remove(model, x, ["net.0", "net.2"])
    assert removed == {"net.0": (32, 29), "net.2": (32, 22)} and not dead.kept
    assert model.net[0].out_features == 29 and model.net[4].in_features == 22
    assert torch.allclose(model(x), before, atol=1e-5)


def test_conv_filters_fold_through_flatten_into_a_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))
    with torch.no_grad():
        model[0].weight[[0, 4]] = 0
        model[0].bias[[0, 4]] = 0.7
    x = torch.randn(5, 1, 8, 8)
    before, removed, _ = _remove(model, x, ["0"])
    assert removed == {"0": (6, 4)} and model[3].in_features == 4 * 36
    assert torch.allclose(model(x), before, atol=1e-5)


def test_cnn_with_batchnorm_and_residual():
    """A dead residual channel (both producers zero) feeding a padded conv: removed when its constant is zero,
    kept with a reason when it is not; outputs never change."""
    torch.manual_seed(0)
    x = ZOO["cnn"].data().tensors[0][:16]
    for zero_bn in (True, False):
        model = ZOO["cnn"].build()
        with torch.no_grad():
            for conv in (model.stem[0], model.block[3]):
                conv.weight[[2, 3]] = 0
            model.stem[0].bias[[2, 3]] = 0
            if zero_bn:
                for bn in (model.stem[1], model.block[4]):
                    bn.weight[[2, 3]] = 0
                    bn.bias[[2, 3]] = 0
            else:
                model.stem[1].bias[[2, 3]] = 1.0  # BN shifts the dead channel to a nonzero constant
        before, removed, dead = _remove(model, x, ["stem.0", "block.0", "block.3"])
        assert torch.allclose(model(x), before, atol=1e-5)
        if zero_bn:
            assert removed == {"stem.0": (8, 6)} and model.stem[1].num_features == 6
        else:
            assert removed == {} and "without a bias" in dead.kept["stem.0"]  # block.0 has no bias


def test_a_channel_with_a_live_branch_is_kept():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.relu(self.a(x) + self.b(x)))

    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():
        model.a.weight[0] = 0  # b still feeds channel 0: not dead
        model.a.weight[1] = 0
        model.b.weight[1] = 0
    x = torch.randn(8, 4)
    before, removed, _ = _remove(model, x, ["a", "b"])
    assert removed == {"a": (6, 5)} and model.head.in_features == 5
    assert torch.allclose(model(x), before, atol=1e-5)


def test_a_nonzero_constant_into_a_layer_without_bias_is_kept():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 1.0
    x = torch.randn(8, 4)
    before, removed, dead = _remove(model, x, ["0"])
    assert removed == {} and "without a bias" in dead.kept["0"]
    assert torch.equal(model(x), before)


def test_a_nonzero_constant_into_a_padded_convolution_is_kept():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 1.0
    x = torch.randn(2, 1, 8, 8)
    before, removed, dead = _remove(model, x, ["0"])
    assert removed == {} and "padded" in dead.kept["0"]
    assert torch.equal(model(x), before)
