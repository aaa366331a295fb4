"""`ChannelPruning` through a real `Trainer.fit`: channels masked on the schedule, then removed, and the
smaller model computes what the masked one did."""

from __future__ import annotations

import copy

import pytest
import torch

from litcompress import ChannelPruning, Pruning, QuantizationAwareTraining
from tests.helpers import Crash, Interrupted, fit
from tests.models import ZOO

pytest.importorskip("torch_pruning")


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _fit(tmp_path, model_name, remove, **kwargs):
    pruning = ChannelPruning(0.5, start=0, end=1, remove_channels=remove, verbose=False, **kwargs)
    _, module = fit(tmp_path, [pruning], model=model_name, max_epochs=2)
    return pruning, module.model


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
def test_removed_model_equals_the_masked_one_and_is_smaller(tmp_path, model_name):
    dense = _params(ZOO[model_name].build())
    _, masked = _fit(tmp_path / "a", model_name, remove=False)
    pruning, removed = _fit(tmp_path / "b", model_name, remove=True)
    assert _params(masked) == dense and _params(removed) < dense
    assert pruning.removed and all(kept == total - total // 2 for total, kept in pruning.removed.values())
    x = ZOO[model_name].data().tensors[0][:16]
    masked.eval(), removed.eval()
    assert torch.allclose(masked(x), removed(x), atol=1e-5)


def test_cnn_shapes_after_removal(tmp_path):
    _, model = _fit(tmp_path, "cnn", remove=True, importance="bn_scale")
    assert model.stem[0].out_channels == model.stem[1].num_features == model.block[3].out_channels == 4
    assert model.block[0].out_channels == model.block[3].in_channels == 4
    assert model.head.in_features == 16 and model.head.out_features == 4  # the output layer keeps its classes


def test_resumed_fit_ends_where_an_uninterrupted_one_ends(tmp_path):
    _, whole = _fit(tmp_path / "whole", "cnn", remove=True)
    pruning = ChannelPruning(0.5, start=0, end=1, verbose=False)
    with pytest.raises(Interrupted):
        fit(tmp_path / "r", [pruning, Crash(5, tmp_path / "c.ckpt")], model="cnn", max_epochs=2)
    pruning = ChannelPruning(0.5, start=0, end=1, verbose=False)
    _, module = fit(tmp_path / "r", [pruning], model="cnn", max_epochs=2, ckpt_path=tmp_path / "c.ckpt")
    state, other = whole.state_dict(), module.model.state_dict()
    assert state.keys() == other.keys()
    assert all(torch.equal(state[k], other[k]) for k in state)


def test_composes_with_qat_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from litcompress.export import export_onnx

    pruning = ChannelPruning(0.5, start=0, end=1, verbose=False)
    _, module = fit(tmp_path, [QuantizationAwareTraining(start=1, verbose=False), pruning], model="mlp",
                          max_epochs=2)
    model = module.model.eval()
    assert model.net[0].out_features == 16 and model.net[2].in_features == 16
    x = ZOO["mlp"].data().tensors[0][:8]
    path = export_onnx(copy.deepcopy(model), x, tmp_path / "m.onnx")
    import onnxruntime as ort

    out = ort.InferenceSession(str(path)).run(None, {ort.InferenceSession(str(path)).get_inputs()[0].name:
                                                     x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), model(x), atol=0.1)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(sparsity={"net": 0.5}), TypeError, "`sparsity`"),
    (dict(sparsity=True), TypeError, "`sparsity`"),
    (dict(sparsity=1.0), ValueError, "`sparsity`"),
    (dict(importance="movement"), ValueError, "`importance`"),
    (dict(remove_channels="yes"), TypeError, "`remove_channels`"),
    (dict(scope="global"), TypeError, "scope"),  # Pruning's options are not ChannelPruning's
    (dict(rewind=True), TypeError, "rewind"),
])
def test_bad_channel_options(kwargs, exc, match):
    args = dict(sparsity=0.5) | kwargs
    with pytest.raises(exc, match=match):
        ChannelPruning(**args)


def test_pruning_points_channel_pattern_to_channel_pruning():
    with pytest.raises(ValueError, match="ChannelPruning"):
        Pruning(0.5, pattern="channel")


def test_learned_qat_scales_are_refused_before_any_step(tmp_path):
    pruning = ChannelPruning(0.5, start=1, verbose=False)
    with pytest.raises(ValueError, match="learned"):
        fit(tmp_path, [QuantizationAwareTraining(scale="learned"), pruning], model="mlp")
