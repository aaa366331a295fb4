"""`QuantizationAwareTraining` driven through real `Trainer.fit` runs on the model zoo."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from litcompress import Pruning, QuantizationAwareTraining
from litcompress.quantization import fake_quant, quantized_layers
from litcompress.quantization.functional import fake_quantize
from tests.helpers import Crash, Interrupted, RecordingLogger, StepCounter, fit
from tests.models import ZOO, LitClassifier


def weights_on_grid(cb):
    """Every fake-quantized weight is an integer multiple of its scale, within the integer range."""
    for module in cb.layers.values():
        for attr, q in module.weight_quantizers.items():
            w = module.weight_tensor(attr).detach()
            scale = q.current_scale(w)
            wq = q(w).detach()
            shape = [1] * w.dim()
            if scale.dim():
                shape[q.axis] = -1  # the weight's output channels: 0, or 1 for Hugging Face's Conv1D
            ints = wq / scale.reshape(shape)
            assert torch.allclose(ints, ints.round(), atol=1e-3), attr
            assert int(ints.round().abs().max()) <= q.qmax


@pytest.mark.parametrize("model", sorted(ZOO))
@pytest.mark.parametrize("scale", ["minmax", "power_of_two", "learned"])
def test_zoo_fit_grid_and_keys(tmp_path, model, scale):
    keys = list(ZOO[model].build().state_dict())
    cb = QuantizationAwareTraining(scale=scale, verbose=False)
    trainer, module = fit(tmp_path, [cb], model=model, n=None, max_epochs=2)
    assert cb.layers and all(m.fake_quant_enabled for m in cb.layers.values())
    weights_on_grid(cb)
    assert list(module.model.state_dict()) == keys
    ZOO[model].build().load_state_dict(module.model.state_dict(), strict=True)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/loss"])))


def test_validation_runs_the_quantized_model(tmp_path):
    cb = QuantizationAwareTraining(weight_bits=2, activation_bits=2, verbose=False)
    _, module = fit(tmp_path, [cb], max_epochs=1)
    module.eval()
    x = ZOO["mlp"].data().tensors[0][:8]
    quantized = module(x)
    with fake_quant(module, False):
        assert not torch.allclose(quantized, module(x))  # 2-bit outputs differ from float ones
    assert torch.equal(quantized, module(x))  # and fake quantization is back on
    first = module.model.net[0]
    q_in, q_w = first.input_quantizers["input"], first.weight_quantizers["weight"]
    scale, zp = q_in.qparams()
    expected = torch.nn.functional.linear(
        fake_quantize(x, scale, zp, q_in.qmin, q_in.qmax), q_w(first.weight), first.bias)
    torch.testing.assert_close(first(x), expected, atol=0, rtol=0)


def test_learned_scales_train_and_join_the_optimizer(tmp_path):
    cb = QuantizationAwareTraining(weight_bits=4, activation_bits=4, scale="learned", start=1, verbose=False)
    trainer, module = fit(tmp_path, [cb], max_epochs=3, optimizer="adam", lr=1e-2)
    q = module.model.net[0].weight_quantizers["weight"]
    assert q.scale.requires_grad and q.scale.grad is not None
    assert not torch.allclose(q.scale, q.observed_scale(module.model.net[0].weight))  # moved from the init
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and any(p is q.scale for p in groups[1]["params"])
    a = module.model.net[0].input_quantizers["input"]
    assert a.learning and a.zero_point is not None


@pytest.mark.parametrize("order", ["prune-first", "qat-first"])
def test_composes_with_pruning_zeros_stay_zero(tmp_path, order):
    prune = Pruning(0.75, scope="layer", schedule="cubic", interval="step", frequency=2, verbose=False)
    qat = QuantizationAwareTraining(verbose=False)
    callbacks = [prune, qat] if order == "prune-first" else [qat, prune]
    fit(tmp_path, callbacks, max_epochs=2)
    for ref in prune.pruner.refs:
        w = ref.tensor
        assert int((w == 0).sum()) == round(0.75 * w.numel())
        layer = ref.module
        assert (layer.weight_quantizers["weight"](w)[w == 0] == 0).all()  # zeros stay zero after fake quantization


def test_bf16_mixed(tmp_path):
    cb = QuantizationAwareTraining(verbose=False)
    fit(tmp_path, [cb], max_epochs=1, precision="bf16-mixed")
    weights_on_grid(cb)


def test_freeze_schedule_and_bn(tmp_path):
    cb = QuantizationAwareTraining(start=1, freeze_observers=2, freeze_bn=2, interval="epoch", verbose=False)
    _, module = fit(tmp_path, [cb], model="cnn", n=None, max_epochs=3)
    assert cb.state_dict()["flags"] == {"enabled": True, "observers_frozen": True, "bn_frozen": True}
    assert all(not q.observing for m in quantized_layers(module).values() for q in m.input_quantizers.values())
    bn = module.model.stem[1]
    assert not bn.training  # kept in eval mode through the last epoch


CONFIGS = {
    "minmax-freeze": dict(start=3, freeze_observers=9, freeze_bn=9, interval="step"),
    "learned": dict(scale="learned", weight_bits=4, start=3, interval="step"),
    "pow2-weightonly": dict(scale="power_of_two", activation_bits=None, start=2, interval="step"),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("cut", [2, 5, 8, 13])  # before start, observing, at an epoch end, after freezing
def test_resume_is_bit_identical(tmp_path, config, cut):
    def run(callbacks, ckpt_path=None):
        return fit(tmp_path, callbacks, model="cnn", n=None, max_epochs=2, optimizer="adam", lr=1e-2,
                   batch_size=16, ckpt_path=ckpt_path)[1]

    reference = run([QuantizationAwareTraining(**CONFIGS[config], verbose=False)])
    with pytest.raises(Interrupted):
        run([QuantizationAwareTraining(**CONFIGS[config], verbose=False), Crash(cut, tmp_path / "cut.ckpt")])
    cb = QuantizationAwareTraining(**CONFIGS[config], verbose=False)
    resumed = run([cb], ckpt_path=tmp_path / "cut.ckpt")
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(reference.named_buffers(), resumed.buffers()):
        assert torch.equal(a, b), name


def test_fit_twice_keeps_layers_converted_once(tmp_path):
    cb = QuantizationAwareTraining(verbose=False)
    _, module = fit(tmp_path, [cb], max_epochs=1)
    first = {n: m.input_quantizers["input"].lo.clone() for n, m in cb.layers.items()}
    fit(tmp_path, [cb], max_epochs=1, module=module)
    assert all(type(m).__name__ == "QATLinear" for m in cb.layers.values())
    assert any(not torch.equal(first[n], m.input_quantizers["input"].lo) for n, m in cb.layers.items())


class NanModule(LitClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 1:
            x = x * float("nan")
        return super().training_step((x, y), batch_idx)


def test_non_finite_input_names_the_layer(tmp_path):
    with pytest.raises(RuntimeError, match=r"non-finite activations .* in `model\.net\.0:input`\. To fix"):
        fit(tmp_path, [QuantizationAwareTraining(verbose=False)], module=NanModule(ZOO["mlp"].build()), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(weight_bits=1), ValueError, r"`weight_bits` to be an int in \[2, 8\]"),
        (dict(weight_bits=16), ValueError, "`weight_bits`"),
        (dict(weight_bits=8.0), TypeError, "`weight_bits`"),
        (dict(activation_bits=9), ValueError, "`activation_bits`"),
        (dict(weight_granularity="per_row"), ValueError, "`weight_granularity`"),
        (dict(scale="mse"), ValueError, "`scale`"),
        (dict(start=2, freeze_observers=1), ValueError, "`freeze_observers` to be None or > `start`"),
        (dict(start=2, freeze_observers=2), ValueError, "`freeze_observers` to be None or > `start`"),
        (dict(start=-1), ValueError, "`start`"),
        (dict(freeze_bn=-2), ValueError, "`freeze_bn`"),
        (dict(interval="batch"), ValueError, "`interval`"),
        (dict(averaging_constant=0), ValueError, "`averaging_constant`"),
        (dict(scale_lr=0), ValueError, "`scale_lr`"),
        (dict(exclude=[1]), TypeError, "`exclude`"),
    ],
)
def test_misconfiguration_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantizationAwareTraining(**kwargs)


class Custom(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("kwargs", "module", "match"),
    [
        (dict(parameters="nothing"), None, "`parameters` to be patterns"),
        (dict(exclude="."), None, "`model` to be a model with at least one"),
        (dict(), LitClassifier(nn.Sequential(Custom(16, 4))), r"0 \(Custom\)"),
        (dict(start=1), None, r"`start` to be before the last optimizer step of the fit \(4\), but got 1"),
        (dict(start=5, interval="step"), None, r"`start` to be before the last optimizer step of the fit \(4\)"),
    ],
)
def test_misconfiguration_before_any_training_step(tmp_path, kwargs, module, match):
    counter = StepCounter()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [QuantizationAwareTraining(**kwargs, verbose=False), counter], module=module, max_epochs=1)
    assert counter.batches == 0


def test_one_clock_for_every_callback(tmp_path):
    """The same `start` means the same optimizer step in both callbacks, by default in epochs."""
    logger = RecordingLogger()
    qat = QuantizationAwareTraining(start=1, verbose=False)
    prune = Pruning(0.5, scope="layer", schedule="one_shot", start=1, verbose=False)
    assert qat.interval == prune.interval == "epoch"

    class WhenOn(pl.Callback):
        first_on: int | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.first_on is None and all(m.fake_quant_enabled for m in qat.layers.values()):
                self.first_on = trainer.global_step - 1  # the step that ran quantized

    when = WhenOn()
    fit(tmp_path, [qat, prune, when], max_epochs=3, logger=logger)  # 4 optimizer steps per epoch
    assert when.first_on == 4
    assert logger.series("pruning/sparsity")[0] == (4, pytest.approx(0.5, abs=0.01))


@pytest.mark.parametrize("scale", ["minmax", "learned"])
def test_tied_weight_is_quantized_in_both_owners_by_one_quantizer(tmp_path, scale):
    cb = QuantizationAwareTraining(scale=scale, weight_bits=4, verbose=False)
    trainer, module = fit(tmp_path, [cb], model="gpt", n=None, max_epochs=1, optimizer="adam", lr=1e-2)
    tok, head = module.model.tok, module.model.lm_head
    assert {"model.tok", "model.lm_head"} <= set(cb.layers)  # the head trains on the grid it is deployed on
    q = tok.weight_quantizers["weight"]
    assert head.weight_quantizers["weight"] is q and head.fake_quant_enabled
    x = ZOO["gpt"].data().tensors[0][:2]
    with torch.no_grad():
        assert torch.equal(tok(x), torch.nn.functional.embedding(x, q(tok.weight)))
    if scale == "learned":  # one step size for the one tensor, in the optimizer once
        params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        assert sum(p is q.scale for p in params) == 1 and q.scale.grad is not None
