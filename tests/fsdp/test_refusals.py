"""What a sharded fit cannot honour is an error in `setup`, before any step (no processes needed: the checks read
the strategy and the model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from litcompress import ChannelPruning, LowRankFactorization, Pruning, QuantizationAwareTraining
from tests.fsdp.common import Classifier, mlp


def _setup(callback, strategy, module=None) -> None:
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback])
    callback.setup(trainer, module if module is not None else Classifier(mlp()), "fit")


@pytest.mark.parametrize("callback", [lambda: Pruning(0.5), lambda: QuantizationAwareTraining(),
                                      lambda: LowRankFactorization(rank_ratio=0.5)])
def test_fsdp1_is_refused_with_the_way_to_fsdp2(callback):
    with pytest.raises(ValueError, match=r"`strategy` to be ModelParallelStrategy \(FSDP2\).*fully_shard"):
        _setup(callback(), FSDPStrategy())


class BuiltInConfigureModel(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.Sequential())


@pytest.mark.parametrize("callback", [lambda: QuantizationAwareTraining(),
                                      lambda: LowRankFactorization(rank_ratio=0.5),
                                      lambda: ChannelPruning(0.5),
                                      lambda: Pruning(0.5, remove_channels=True)])
def test_layer_swaps_need_layers_before_sharding(callback):
    with pytest.raises(ValueError, match=r"layers built in the LightningModule's __init__.*build the layers in"):
        _setup(callback(), ModelParallelStrategy(), BuiltInConfigureModel())


def test_pruning_selects_layers_built_in_configure_model():
    """Pruning only masks tensors: layers built (and sharded) in configure_model are selected when the fit starts."""
    _setup(Pruning(0.5), ModelParallelStrategy(), BuiltInConfigureModel())
