"""`LowRankFactorization` through a real `Trainer.fit`: layers factorized before or during the fit, the optimizer
trains the new factors, and a fit resumed after the change ends where an uninterrupted one ends."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litcompress import LowRankFactorization
from litcompress.callbacks._structure import check_mid_fit
from litcompress.factorization import Factorized
from litcompress.structure import match_structure_
from tests.helpers import Crash, Interrupted, RecordingLogger, fit
from tests.models import ZOO, LitClassifier, trainer_kwargs


class Watch(LowRankFactorization.__mro__[-2]):  # a plain Callback: records the loss and the factors' values
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_factorized_before_training(tmp_path):
    lowrank = LowRankFactorization(rank=4, verbose=False)
    _, module = fit(tmp_path, [lowrank], model="mlp", max_epochs=1)
    net = module.model.net
    assert [type(m).__name__ for m in net] == ["Factorized", "ReLU", "Factorized", "ReLU", "Linear"]
    assert lowrank.results["model.net.4"].factorized is False  # 4 * (32 + 4) > 32 * 4: kept dense
    assert net[0].rank == net[2].rank == 4
    assert _params(module.model) == (4 * (16 + 32) + 32) + (4 * (32 + 32) + 32) + (32 * 4 + 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mid_fit_factorization_trains_the_new_factors(tmp_path, optimizer):
    """At epoch 2 of 4 (step 8): the optimizer holds the factors, steps them, and the loss keeps falling."""
    lowrank, watch = LowRankFactorization(rank=8, start=2, exclude="<last>", verbose=False), Watch()
    logger = RecordingLogger()
    trainer, module = fit(tmp_path, [lowrank, watch], model="mlp", max_epochs=4, optimizer=optimizer,
                          lr=0.05 if optimizer == "sgd" else 0.01, logger=logger)
    first = module.model.net[0]
    assert isinstance(first, Factorized)
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters()} == held  # every parameter of the new structure, nothing stale
    state = trainer.optimizers[0].state
    assert first.first.weight in state and first.second.weight in state  # stepped since the change
    assert logger.series("lowrank/params")[0][0] == 8
    after = watch.losses[8:]
    assert sum(after[-4:]) < sum(after[:4])  # training continues on the factorized model


def test_bias_state_is_carried_and_lr_schedule_continues(tmp_path):
    class Scheduled(LitClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    class Peek(Watch):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 4:  # just before the change (this callback runs after the factorization)
                opt = trainer.optimizers[0]
                self.bias = pl_module.model.net[0].second.bias
                self.momentum = opt.state[self.bias]["momentum_buffer"].clone()
                self.lr = opt.param_groups[0]["lr"]

    peek = Peek()
    module = Scheduled(ZOO["mlp"].build())
    bias = module.model.net[0].bias
    trainer, _ = fit(tmp_path, [LowRankFactorization(rank=4, start=1, verbose=False), peek], module=module,
                     max_epochs=2)
    assert peek.bias is bias and peek.lr == pytest.approx(0.1 * 0.5)  # one epoch of StepLR before the change
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert torch.count_nonzero(peek.momentum) > 0


def test_resumed_after_the_change_ends_where_an_uninterrupted_fit_ends(tmp_path):
    _, whole = fit(tmp_path / "whole", [LowRankFactorization(energy=0.8, start=1, verbose=False)], model="cnn",
                   max_epochs=3, optimizer="adam", lr=0.01)
    with pytest.raises(Interrupted):  # step 6: after the change at step 4
        fit(tmp_path / "r", [LowRankFactorization(energy=0.8, start=1, verbose=False), Crash(6, tmp_path / "c.ckpt")],
            model="cnn", max_epochs=3, optimizer="adam", lr=0.01)
    lowrank = LowRankFactorization(energy=0.8, start=1, verbose=False)
    _, resumed = fit(tmp_path / "r", [lowrank], model="cnn", max_epochs=3, optimizer="adam", lr=0.01,
                     ckpt_path=tmp_path / "c.ckpt")
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(".first." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_before_the_change_ends_where_an_uninterrupted_fit_ends(tmp_path):
    _, whole = fit(tmp_path / "whole", [LowRankFactorization(rank=2, start=1, verbose=False)], max_epochs=2)
    with pytest.raises(Interrupted):
        fit(tmp_path / "r", [LowRankFactorization(rank=2, start=1, verbose=False), Crash(2, tmp_path / "c.ckpt")],
            max_epochs=2)
    _, resumed = fit(tmp_path / "r", [LowRankFactorization(rank=2, start=1, verbose=False)], max_epochs=2,
                     ckpt_path=tmp_path / "c.ckpt")
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_loads_for_inference_in_a_fresh_model(tmp_path):
    with pytest.raises(Interrupted):
        fit(tmp_path, [LowRankFactorization(rank=3, start=1, verbose=False), Crash(6, tmp_path / "c.ckpt")],
            max_epochs=3)
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    fresh = LitClassifier(ZOO["mlp"].build())
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing key"):
        fresh.load_state_dict(saved)
    fresh = LitClassifier(ZOO["mlp"].build())
    assert match_structure_(fresh, saved) == ["model.net.0", "model.net.2", "model.net.4"]  # 3 * 36 < 128
    fresh.load_state_dict(saved)
    assert fresh.model.net[0].rank == 3


def test_rank_beyond_a_layer_is_refused_before_any_step(tmp_path):
    module = LitClassifier(ZOO["mlp"].build())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"at most 4 for layer `model.net.4`"):
        fit(tmp_path, [LowRankFactorization(rank=5)], module=module, max_epochs=1)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_failure_before_the_first_batch_restores_the_layers(tmp_path):
    class Broken(Watch):
        def on_train_start(self, trainer, pl_module) -> None:
            raise RuntimeError("boom")

    module = LitClassifier(ZOO["mlp"].build())
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [LowRankFactorization(rank=4, verbose=False), Broken()], module=module, max_epochs=1)
    assert all(not isinstance(m, Factorized) for m in module.modules())


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({}, TypeError, "exactly one of"),
    ({"rank": 2, "energy": 0.5}, ValueError, "exactly one of"),
    ({"rank": 2, "start": -1}, ValueError, "`start`"),
    ({"rank": 2, "interval": "batch"}, ValueError, "interval"),
    ({"energy": 1.5}, ValueError, "energy"),
    ({"rank": 2, "parameters": "("}, ValueError, "regular expressions"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LowRankFactorization(**kwargs)


def test_a_point_the_fit_never_reaches_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`start`"):
        fit(tmp_path, [LowRankFactorization(rank=2, start=5, verbose=False)], max_epochs=2)


def test_explicitly_selected_unfactorizable_layer_is_named(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match=r"model\.1\.weight.*grouped convolution"):
        fit(tmp_path, [LowRankFactorization(rank=1, parameters=r"1\.weight")], model="cnn",
            module=LitClassifier(net), max_epochs=1)
    fit(tmp_path, [LowRankFactorization(rank=1, verbose=False)], model="cnn", module=LitClassifier(net),
        max_epochs=1)  # the default selection leaves the grouped convolution out
    assert isinstance(net[1], nn.Conv2d) and isinstance(net[0], Factorized)


def test_mid_fit_change_needs_a_single_device():
    with pytest.raises(ValueError, match="single device"):
        check_mid_fit(SimpleNamespace(strategy=object()), "LowRankFactorization", "start", 2)  # type: ignore[arg-type]


def test_composes_with_qat_when_factorized_first(tmp_path):
    """Factorized in `setup` before QAT converts the layers: QAT quantizes both factors, and the model exports."""
    pytest.importorskip("onnxruntime")
    from litcompress import QuantizationAwareTraining
    from litcompress.export import export_onnx
    from litcompress.quantization import quantized_layers

    lowrank = LowRankFactorization(rank=4, exclude="<last>", verbose=False)
    _, module = fit(tmp_path, [lowrank, QuantizationAwareTraining(verbose=False)], max_epochs=2)
    names = set(quantized_layers(module.model))
    assert {"net.0.first", "net.0.second", "net.2.first", "net.2.second"} <= names
    path = export_onnx(module.model, torch.randn(4, 16), tmp_path / "m.onnx")
    assert path.stat().st_size > 0


def test_factorizing_a_quantized_layer_is_refused_with_the_order_to_use(tmp_path):
    from litcompress import QuantizationAwareTraining

    with pytest.raises(ValueError, match="before QuantizationAwareTraining"):
        fit(tmp_path, [QuantizationAwareTraining(verbose=False), LowRankFactorization(rank=2, parameters="net")],
            max_epochs=1)


def test_distillation_student_shrinks_teacher_does_not(tmp_path):
    from litcompress import DistillationModule

    class Distill(DistillationModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.student.parameters(), lr=0.01)

    torch.manual_seed(0)
    teacher, student = ZOO["mlp"].build(), ZOO["mlp"].build()
    module = Distill(student, teacher)
    lowrank = LowRankFactorization(rank=4, start=1, exclude="<last>", verbose=False)
    fit(tmp_path, [lowrank], module=module, max_epochs=2)
    assert isinstance(student.net[0], Factorized) and isinstance(teacher.net[0], nn.Linear)
    assert all(isinstance(m, nn.Linear) for m in teacher.modules() if not isinstance(m, (nn.Sequential,
                                                                                          nn.ReLU, type(teacher))))


def test_mid_fit_factorization_of_layers_qat_converts_is_refused_before_the_first_step(tmp_path):
    from litcompress import QuantizationAwareTraining

    module = LitClassifier(ZOO["mlp"].build())
    with pytest.raises(ValueError, match=r"`start`.*net.0.*quantized for training"):
        fit(tmp_path, [LowRankFactorization(rank=2, start=1), QuantizationAwareTraining(verbose=False)],
            module=module, max_epochs=2)
    assert all(not isinstance(m, Factorized) for m in module.modules())


def test_gpt2_tied_head_stays_dense_and_tied_with_a_warning(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf_models import LitHF, gpt2
    from tests.test_hf_models import fit as fit_hf

    module = LitHF(gpt2())
    lowrank = LowRankFactorization(rank=2, verbose=False)
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to .*wte"):
        fit_hf(tmp_path, "gpt2", [lowrank], module=module)
    model = module.model
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor
    assert isinstance(model.transformer.h[0].mlp.c_fc, Factorized)
    assert "model.lm_head" not in lowrank.results


def test_explicitly_selected_tied_head_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf_models import LitHF, gpt2
    from tests.test_hf_models import fit as fit_hf

    with pytest.raises(ValueError, match=r"wte.weight.*tied to model\.lm_head"):
        fit_hf(tmp_path, "gpt2", [LowRankFactorization(rank=2, parameters="lm_head")], module=LitHF(gpt2()))
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = shared.weight
    from litcompress.factorization import factorize_

    with pytest.raises(ValueError, match="tied to 2"):
        factorize_(model, ["0"], rank=1)


def _t5() -> nn.Module:  # T5DenseActDense reads `wo.weight.dtype` in its forward
    import transformers

    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0))


def _vit() -> nn.Module:  # ViTModel reads `patch_embeddings.projection.weight.dtype` (a Conv2d) in its forward
    import transformers

    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=3))


class _LitHF(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        key = "input_ids" if x.dtype == torch.long else "pixel_values"
        return self.model(**{key: x}, labels=y).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize(("kind", "layer"), [("t5", "model.encoder.block.0.layer.1.DenseReluDense.wo"),
                                             ("vit", "model.vit.embeddings.patch_embeddings.projection")])
def test_models_that_read_a_layers_weight_train_after_factorization(tmp_path, kind, layer, start):
    """T5 and ViT read the replaced layer's `.weight` in their forward: the steps after the change run and train the
    factors (before, the first one failed with AttributeError)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "t5":
        ids = torch.randint(0, 64, (16, 8), generator=g)
        data = TensorDataset(ids, ids)
    else:
        data = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g))
    module, watch = _LitHF(_t5() if kind == "t5" else _vit()), Watch()
    lowrank = LowRankFactorization(rank=2, start=start, interval="step", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[lowrank, watch])
    trainer.fit(module, DataLoader(data, batch_size=4))
    factorized = module.get_submodule(layer)
    assert isinstance(factorized, Factorized) and lowrank.results[layer].factorized
    assert len(watch.losses) == 4 and all(math.isfinite(loss) for loss in watch.losses)
    state = trainer.optimizers[0].state
    assert factorized.first.weight in state and factorized.second.weight in state  # stepped after the change
