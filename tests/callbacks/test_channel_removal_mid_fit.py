"""`ChannelPruning(remove_at=...)`: channels removed during the fit, the optimizer trains the smaller
model with the kept slices of its state, and a fit resumed after the removal ends where an uninterrupted one ends."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.flop_counter import FlopCounterMode

from litcompress import ChannelPruning, Pruning
from tests.helpers import Crash, Interrupted, fit
from tests.models import ZOO

pytest.importorskip("torch_pruning")


class Watch(Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _flops(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
def test_removed_mid_fit_then_trained(tmp_path, model_name):
    x = ZOO[model_name].data().tensors[0][:8]
    dense = ZOO[model_name].build()
    flops_dense, params_dense = _flops(dense, x), sum(p.numel() for p in dense.parameters())
    pruning, watch = ChannelPruning(0.5, start=0, end=1, remove_at=2, verbose=False), Watch()
    trainer, module = fit(tmp_path, [pruning, watch], model=model_name, max_epochs=5, optimizer="adam", lr=0.01)
    model = module.model
    assert pruning.removed and pruning.pruner is None
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters()}  # the optimizer holds the smaller tensors, nothing stale
    params = sum(p.numel() for p in model.parameters())
    assert params < 0.75 * params_dense and _flops(model, x) < 0.75 * flops_dense
    after = watch.losses[8:]
    assert sum(after[-4:]) < sum(after[:4])  # the smaller model keeps learning


def test_flops_drop_as_predicted_for_the_mlp(tmp_path):
    """Hidden widths 32 -> 16: each Linear's multiply-adds follow its kept inputs and outputs."""
    pruning = ChannelPruning(0.5, start=0, end=1, remove_at=1, verbose=False)
    _, module = fit(tmp_path, [pruning], model="mlp", max_epochs=2)
    x = torch.randn(8, 16)
    expected = 2 * 8 * (16 * 16 + 16 * 16 + 16 * 4)
    assert _flops(module.model, x) == expected
    assert [m.out_features for m in module.model.net if hasattr(m, "out_features")] == [16, 16, 4]


def test_adam_moments_of_kept_channels_carry_over(tmp_path):
    """The head's input columns shrink: its Adam moments after the removal are the kept columns of the ones before."""

    class Peek(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 4 and not hasattr(self, "state"):
                w = pl_module.model.head.weight
                self.state = {k: v.clone() for k, v in trainer.optimizers[0].state[w].items()}

    before, after = Peek(), Peek()  # around Pruning, whose removal happens in the same hook at step 4
    pruning = ChannelPruning(0.5, start=0, end=1, remove_at=1, verbose=False)
    fit(tmp_path, [before, pruning, after], model="cnn", max_epochs=2, optimizer="adam", lr=0.01,
        limit_train_batches=4)
    state = after.state
    kept = state["exp_avg"].shape[1]
    assert kept == before.state["exp_avg"].shape[1] // 2
    # the head reads 4 pooled positions per channel: find the kept columns by matching values
    old = before.state["exp_avg"]
    cols = [next(j for j in range(old.shape[1]) if torch.equal(old[:, j], state["exp_avg"][:, i]))
            for i in range(kept)]
    assert cols == sorted(cols) and len(set(cols)) == kept
    assert torch.equal(state["exp_avg_sq"], before.state["exp_avg_sq"][:, cols])
    assert torch.equal(state["step"], before.state["step"])


def test_resumed_after_the_removal_ends_where_an_uninterrupted_fit_ends(tmp_path):
    def make():
        return ChannelPruning(0.5, start=0, end=1, remove_at=1, verbose=False)

    _, whole = fit(tmp_path / "whole", [make()], model="cnn", max_epochs=3, optimizer="adam", lr=0.01)
    with pytest.raises(Interrupted):
        fit(tmp_path / "r", [make(), Crash(6, tmp_path / "c.ckpt")], model="cnn", max_epochs=3, optimizer="adam",
            lr=0.01)
    pruning = make()
    _, resumed = fit(tmp_path / "r", [pruning], model="cnn", max_epochs=3, optimizer="adam", lr=0.01,
                     ckpt_path=tmp_path / "c.ckpt")
    assert pruning.removed
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and a["model.stem.0.weight"].shape[0] == 4
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"remove_at": 2, "remove_channels": False}, "remove_channels=False"),
    ({"remove_at": 1, "end": 2}, "at or after `end`"),
    ({"remove_at": 0}, "remove_at"),
])
def test_bad_remove_at(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelPruning(0.5, **kwargs)


def test_remove_at_is_channel_pruning_only():
    with pytest.raises(TypeError, match="remove_at"):
        Pruning(0.5, remove_at=2)  # type: ignore[call-arg]


def test_remove_at_before_the_default_end_is_refused_before_any_step(tmp_path):
    with pytest.raises(ValueError, match="schedule's end"):  # end=None: 75% of 4 epochs, step 12 > step 4
        fit(tmp_path, [ChannelPruning(0.5, start=0, remove_at=1)], model="cnn", max_epochs=4)


def test_composes_with_qat_frozen_ranges(tmp_path):
    from litcompress import QuantizationAwareTraining
    from litcompress.quantization import quantized_layers

    qat = QuantizationAwareTraining(start=0, freeze_observers=1, verbose=False)
    pruning = ChannelPruning(0.5, start=0, end=1, remove_at=2, verbose=False)
    watch = Watch()
    _, module = fit(tmp_path, [pruning, qat, watch], model="cnn", max_epochs=4)
    layers = quantized_layers(module.model)
    assert layers and module.model.stem[0].out_channels == 4
    for layer in layers.values():
        for key, q in layer.weight_quantizers.items():
            if q.scale is not None and q.axis is not None:
                assert q.scale.numel() == layer.weight_tensor(key).shape[q.axis]
    assert all(torch.isfinite(torch.tensor(watch.losses)))
    assert sum(watch.losses[-4:]) < sum(watch.losses[8:12])


def test_transformer_heads_removed_mid_fit_and_resumed(tmp_path):
    """The encoder's attention layers lose half their heads at epoch 1; a fit resumed after that ends as the
    uninterrupted one (the checkpoint restores the narrower attention layers)."""
    from litcompress.sparsity.heads import PrunedMultiheadAttention

    def make():
        return ChannelPruning(0.5, start=0, end=1, remove_at=1, verbose=False)

    _, whole = fit(tmp_path / "whole", [make()], model="transformer", max_epochs=3, optimizer="adam", lr=0.01)
    attn = whole.model.blocks[0].attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 1
    with pytest.raises(Interrupted):
        fit(tmp_path / "r", [make(), Crash(6, tmp_path / "c.ckpt")], model="transformer", max_epochs=3,
            optimizer="adam", lr=0.01)
    _, resumed = fit(tmp_path / "r", [make()], model="transformer", max_epochs=3, optimizer="adam", lr=0.01,
                     ckpt_path=tmp_path / "c.ckpt")
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
