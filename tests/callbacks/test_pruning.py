"""`Pruning` driven through real `Trainer.fit` runs on the model zoo."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from litcompress import Pruning
from litcompress.schedules import cubic, exponential, linear
from litcompress.sparsity import check_nm
from tests.helpers import Crash, Interrupted, RecordingLogger, StepCounter, ZeroWatch, fit
from tests.models import ZOO, LitClassifier


def zeros(module, name):
    return int((dict(module.named_parameters())[name] == 0).sum())


def pruned_names(cb):
    return [r.name for r in cb.pruner.refs]


@pytest.mark.parametrize("model", sorted(ZOO))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_zoo_reaches_exact_target_zeros_stay_zero_keys_unchanged(tmp_path, model, scope):
    keys_before = list(ZOO[model].build().state_dict())
    watch = ZeroWatch()
    cb = Pruning(0.6, schedule="cubic", interval="step", frequency=3, scope=scope, verbose=False)
    _, module = fit(tmp_path, [cb, watch], model=model, n=None, max_epochs=2)
    params = dict(module.named_parameters())
    names = pruned_names(cb)
    counts = {n: int((params[n] == 0).sum()) for n in names}
    sizes = {n: params[n].numel() for n in names}
    if scope == "layer":
        assert counts == {n: round(0.6 * sizes[n]) for n in names}
    else:
        assert sum(counts.values()) == round(0.6 * sum(sizes.values()))
    assert watch.checks > 0 and watch.revived == 0
    assert list(module.model.state_dict()) == keys_before
    fresh = ZOO[model].build()
    fresh.load_state_dict(module.model.state_dict(), strict=True)
    for mask in cb.pruner.masks.values():
        assert mask.dtype == torch.bool and mask.element_size() == 1


@pytest.mark.parametrize(("schedule", "fn"), [("linear", linear), ("cubic", cubic), ("exponential", exponential),
                                               ("one_shot", lambda p: 1.0), (lambda p: p**2, lambda p: p**2)])
def test_logged_schedule_values_and_counts(tmp_path, schedule, fn):
    logger = RecordingLogger()
    cb = Pruning(0.8, scope="layer", schedule=schedule, interval="step", start=2, end=10, frequency=3, verbose=False)
    _, module = fit(tmp_path, [cb], max_steps=12, max_epochs=None, logger=logger, log_every_n_steps=100)
    overall = logger.series("pruning/sparsity")
    assert [s for s, _ in overall] == [2, 5, 8, 10]
    sizes = {n: dict(module.named_parameters())[n].numel() for n in pruned_names(cb)}
    total = sum(sizes.values())
    for step, value in overall:
        target = 0.8 * fn((step - 2) / 8)
        expected = {n: round(target * k) for n, k in sizes.items()}
        assert value == pytest.approx(sum(expected.values()) / total, abs=1e-12)
        for n, k in sizes.items():
            assert dict(logger.series(f"pruning/sparsity/{n}"))[step] == pytest.approx(expected[n] / k, abs=1e-12)
    # the last logged value is what the weights hold: each tensor counted once
    assert overall[-1][1] == pytest.approx(sum(zeros(module, n) for n in sizes) / total, abs=1e-12)


def test_tied_weight_counted_once_in_logged_sparsity(tmp_path):
    logger = RecordingLogger()
    cb = Pruning(0.5, scope="layer", schedule="one_shot", verbose=False)
    _, module = fit(tmp_path, [cb], model="gpt", n=None, max_epochs=1, logger=logger)
    names = pruned_names(cb)
    assert "model.tok.weight" in names and "model.lm_head.weight" not in names
    total = sum(dict(module.named_parameters())[n].numel() for n in names)
    assert logger.series("pruning/sparsity")[-1][1] == pytest.approx(sum(zeros(module, n) for n in names) / total)
    assert torch.equal(module.model.lm_head.weight == 0, module.model.tok.weight == 0)


@pytest.mark.parametrize("model", ["mlp", "transformer", "lstm", "gpt"])
def test_nm_pattern_through_fit(tmp_path, model):
    cb = Pruning(pattern="2:4", schedule="linear", interval="step", frequency=2, verbose=False)
    fit(tmp_path, [cb], model=model, n=None, max_epochs=2)
    for ref in cb.pruner.refs:
        w = ref.tensor
        assert check_nm(w, 2, 4, dim=ref.input_dim), ref.name
        assert int((w == 0).sum()) == w.numel() // 2


def test_nm_on_conv_groups_input_channels(tmp_path):
    cb = Pruning(pattern="1:4", exclude=["<first>"], interval="step", frequency=2, verbose=False)
    _, module = fit(tmp_path, [cb], model="cnn", n=None, max_epochs=1)
    w = module.model.block[0].weight  # (out, in, kh, kw): groups of 4 input channels
    assert check_nm(w, 1, 4, dim=1) and not check_nm(w, 1, 4, dim=0)


@pytest.mark.parametrize("importance", ["movement", "taylor", "random", "callable"])
def test_importance_options_reach_target(tmp_path, importance):
    fn = (lambda name, w: -w.abs()) if importance == "callable" else importance
    cb = Pruning(0.5, scope="layer", importance=fn, interval="step", start=1, frequency=2, verbose=False)
    fit(tmp_path, [cb], max_epochs=2)
    for ref in cb.pruner.refs:
        assert int((ref.tensor == 0).sum()) == ref.tensor.numel() // 2


def test_callable_importance_decides_what_goes(tmp_path):
    torch.manual_seed(0)
    initial = {n: p.detach().clone() for n, p in LitClassifier(ZOO["mlp"].build()).named_parameters()}
    cb = Pruning(0.5, scope="layer", importance=lambda name, w: -w.abs(), schedule="one_shot", verbose=False)
    fit(tmp_path, [cb], max_epochs=1, lr=0.0)  # lr 0: the weights stay as they were scored
    for ref in cb.pruner.refs:
        w0 = initial[ref.name].abs().flatten()
        kept = cb.pruner.masks[ref.name].flatten()
        assert w0[kept].max() <= w0[~kept].min()  # the user asked to keep the smallest


def test_random_importance_seeded(tmp_path):
    def masks(seed):
        cb = Pruning(0.5, scope="layer", importance="random", schedule="one_shot", seed=seed, verbose=False)
        fit(tmp_path, [cb], max_epochs=1)
        return cb.pruner.masks

    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_movement_differs_from_magnitude(tmp_path):
    def mask(importance):
        cb = Pruning(0.5, scope="layer", importance=importance, interval="step", start=3, end=6, frequency=3,
                     verbose=False)
        fit(tmp_path, [cb], max_epochs=2, optimizer="adam", lr=1e-2)
        return cb.pruner.masks["model.net.0.weight"]

    assert not torch.equal(mask("magnitude"), mask("movement"))


def test_epoch_interval_updates_at_epoch_boundaries(tmp_path):
    logger = RecordingLogger()
    cb = Pruning(0.5, scope="layer", schedule="linear", interval="epoch", start=1, end=3, verbose=False)
    fit(tmp_path, [cb], max_epochs=4, logger=logger)  # 4 batches per epoch
    assert logger.series("pruning/sparsity")[0][0] == 4
    steps = [s for s, _ in logger.series("pruning/sparsity")]
    values = [round(v, 3) for _, v in logger.series("pruning/sparsity")]
    assert steps == [4, 8, 12] and values[0] == 0.0 and values[-1] == 0.5


@pytest.mark.parametrize(("n", "batch_size", "epochs", "expected"),
                         [(64, 16, 4, [0, 4, 8, 12]), (256, 1, 1, [0, 100, 192])])
def test_defaults_epochs_global_threshold_target_at_three_quarters(tmp_path, n, batch_size, epochs, expected):
    logger = RecordingLogger()  # 4 steps per epoch at batch 16 (16 in all); 256 at batch 1
    cb = Pruning(0.5, schedule="linear", verbose=False)
    assert (cb.interval, cb.frequency, cb.end, cb.scope) == ("epoch", None, None, "global")
    fit(tmp_path, [cb], max_epochs=epochs, batch_size=batch_size, n=n, logger=logger)
    # updates every epoch (at most every 100 steps); the target is reached at 3/4 of the fit
    assert [s for s, _ in logger.series("pruning/sparsity")] == expected
    assert logger.series("pruning/sparsity")[-1][1] == pytest.approx(0.5, abs=1e-3)
    last = [m for _, m in logger.records if "pruning/sparsity" in m][-1]
    per_tensor = [v for k, v in last.items() if k.startswith("pruning/sparsity/")]
    assert len(set(per_tensor)) > 1  # one global threshold: tensors end at different sparsities


def test_default_scope_is_per_layer_for_mappings_and_nm():
    assert Pruning({r"net\.0": 0.5}, verbose=False).scope == "layer"
    assert Pruning(pattern="2:4", verbose=False).scope == "layer"
    assert Pruning(0.5, scope="layer", verbose=False).scope == "layer"


def test_gradient_accumulation_and_end_none(tmp_path):
    logger = RecordingLogger()
    cb = Pruning(0.7, scope="layer", schedule="cubic", interval="step", frequency=2, verbose=False)
    trainer, _ = fit(tmp_path, [cb], max_epochs=2, accumulate_grad_batches=3, logger=logger)
    assert trainer.global_step == 4  # ceil(4 / 3) * 2
    assert [s for s, _ in logger.series("pruning/sparsity")] == [0, 2, 3]  # end=None: 3/4 of the 4 steps
    for ref in cb.pruner.refs:
        assert int((ref.tensor == 0).sum()) == round(0.7 * ref.tensor.numel())


def test_dict_sparsity_per_tensor_targets(tmp_path):
    cb = Pruning({r"net\.0": 0.3, r"net\.2": 0.9}, schedule="linear", interval="step", frequency=2, verbose=False)
    _, module = fit(tmp_path, [cb], max_epochs=2)
    net = module.model.net
    assert int((net[0].weight == 0).sum()) == round(0.3 * net[0].weight.numel())
    assert int((net[2].weight == 0).sum()) == round(0.9 * net[2].weight.numel())
    assert int((net[4].weight == 0).sum()) == 0


def test_exclude_first_and_last_in_one_line(tmp_path):
    cb = Pruning(0.5, scope="layer", exclude=["<first>", "<last>"], verbose=False)
    _, module = fit(tmp_path, [cb], max_epochs=1)
    assert pruned_names(cb) == ["model.net.2.weight"]
    assert int((module.model.net[0].weight == 0).sum()) == 0 and int((module.model.net[4].weight == 0).sum()) == 0


class Snapshot(pl.Callback):
    def __init__(self, step):
        self.step, self.weights = step, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_rewind_resets_survivors_to_weights_at_start(tmp_path):
    snap = Snapshot(3)
    cb = Pruning(0.5, scope="layer", schedule="linear", interval="step", start=3, end=8, frequency=1, rewind=True,
                 verbose=False)
    _, module = fit(tmp_path, [snap, cb], max_steps=8, max_epochs=None)
    params = dict(module.named_parameters())
    for ref in cb.pruner.refs:
        name = ref.name
        assert torch.equal(params[name], snap.weights[name] * cb.pruner.masks[name])
    # untouched tensors keep training
    assert not torch.equal(params["model.net.0.bias"], snap.weights["model.net.0.bias"])
    # without rewind the survivors are the trained weights, not the start ones
    cb2 = Pruning(0.5, scope="layer", schedule="linear", interval="step", start=3, end=8, frequency=1, verbose=False)
    snap2 = Snapshot(3)
    _, plain = fit(tmp_path, [snap2, cb2], max_steps=8, max_epochs=None)
    name = cb2.pruner.refs[0].name
    assert not torch.equal(dict(plain.named_parameters())[name], snap2.weights[name] * cb2.pruner.masks[name])


CONFIGS = {
    "magnitude-cubic": dict(sparsity=0.7, scope="layer", schedule="cubic", interval="step", start=3, end=11,
                            frequency=2),
    "movement-rewind": dict(sparsity=0.6, scope="layer", schedule="linear", interval="step", start=3, end=11,
                            frequency=2, importance="movement", rewind=True),
    "taylor-global": dict(sparsity=0.6, schedule="exponential", interval="step", start=2, frequency=3,
                          importance="taylor", scope="global"),
    "random-2:4-epoch": dict(pattern="2:4", interval="epoch", start=1, end=3, importance="random"),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("cut", [2, 5, 8, 13])  # before start, mid-schedule mid-epoch, at an epoch end, after end
def test_resume_is_bit_identical(tmp_path, config, cut):
    def run(callbacks, ckpt_path=None):
        return fit(tmp_path, callbacks, max_epochs=4, optimizer="adam", lr=1e-2, ckpt_path=ckpt_path)[1]

    reference = run([Pruning(**CONFIGS[config], verbose=False)])
    ckpt = tmp_path / "cut.ckpt"
    with pytest.raises(Interrupted):
        run([Pruning(**CONFIGS[config], verbose=False), Crash(cut, ckpt)])
    cb = Pruning(**CONFIGS[config], verbose=False)
    resumed = run([cb], ckpt_path=ckpt)
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert cb.pruner.global_sparsity() >= 0.5


def test_state_key_is_stable_for_callables():
    def make():
        return Pruning(0.5, scope="layer", parameters=lambda module, name: "net" in name,
                       importance=lambda n, w: w.abs())

    assert make().state_key == make().state_key  # a lambda's address must not leak into the checkpoint key
    assert "0x" not in make().state_key


def test_two_instances_in_one_trainer_and_checkpoint(tmp_path):
    logger = RecordingLogger()
    a = Pruning(0.3, scope="layer", parameters=r"net\.0", log_prefix="a", verbose=False)
    b = Pruning(0.8, scope="layer", pattern="unstructured", parameters=r"net\.[24]", log_prefix="b", verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, module = fit(tmp_path, [a, b, checkpoint], max_epochs=2, logger=logger, enable_checkpointing=True)
    net = module.model.net
    assert int((net[0].weight == 0).sum()) == round(0.3 * net[0].weight.numel())
    assert int((net[2].weight == 0).sum()) == round(0.8 * net[2].weight.numel())
    assert logger.series("a/sparsity")[-1][1] == pytest.approx(0.3, abs=1e-2)
    assert logger.series("b/sparsity")[-1][1] == pytest.approx(0.8, abs=1e-2)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert a.state_key in saved["callbacks"] and b.state_key in saved["callbacks"]
    # the checkpoint's model weights load into the plain model class
    plain = LitClassifier(ZOO["mlp"].build())
    plain.load_state_dict(saved["state_dict"], strict=True)
    overlap = Pruning(0.5, scope="layer", parameters=r"net\.2", verbose=False)
    with pytest.raises(ValueError, match="disjoint selections"):
        fit(tmp_path, [Pruning(0.5, scope="layer", verbose=False), overlap], max_epochs=1)


def masks_enforced_by(optimizer, module):
    """Whether a step of ``optimizer`` still re-applies masks (a leaked hook would) to weights set to ones."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return any(bool((p == 0).any()) for p in module.parameters())


def test_repeated_fit_keeps_masks_and_leaks_no_hooks(tmp_path):
    cb = Pruning(0.5, scope="layer", schedule="one_shot", verbose=False)
    trainer, module = fit(tmp_path, [cb], max_epochs=1)
    first = {n: m.clone() for n, m in cb.pruner.masks.items()}
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    assert not masks_enforced_by(trainer.optimizers[0], module)
    module.load_state_dict(saved)
    trainer2 = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=[cb], default_root_dir=tmp_path)
    from tests.models import ResumableLoader, classification_data
    data = classification_data((16,), n=64)
    trainer2.fit(module, ResumableLoader(data))
    for n, m in cb.pruner.masks.items():
        assert not (m & ~first[n]).any()  # pruned stays pruned
    assert not masks_enforced_by(trainer2.optimizers[0], module)


def test_bf16_mixed_precision(tmp_path):
    watch = ZeroWatch()
    cb = Pruning(0.75, scope="layer", interval="step", frequency=2, verbose=False)
    fit(tmp_path, [cb, watch], max_epochs=2, precision="bf16-mixed")
    assert watch.revived == 0
    for ref in cb.pruner.refs:
        assert int((ref.tensor == 0).sum()) == round(0.75 * ref.tensor.numel())


class ManualModule(LitClassifier):
    def __init__(self, model):
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization(tmp_path):
    watch = ZeroWatch()
    cb = Pruning(0.5, scope="layer", interval="step", frequency=2, importance="movement", start=1, verbose=False)
    fit(tmp_path, [cb, watch], max_epochs=2, module=ManualModule(ZOO["mlp"].build()))
    assert watch.revived == 0
    for ref in cb.pruner.refs:
        assert int((ref.tensor == 0).sum()) == ref.tensor.numel() // 2


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(sparsity=1.0), ValueError, r"`sparsity` to be a float in the \[0, 1\) range, but got 1.0"),
        (dict(sparsity=-0.1), ValueError, "`sparsity`"),
        (dict(), TypeError, "`sparsity`"),
        (dict(sparsity="half"), TypeError, "`sparsity`"),
        (dict(sparsity={"net": 1.2}), ValueError, r"sparsity\['net'\]"),
        (dict(sparsity={"net": 0.5}, scope="global"), ValueError, "`scope` to be 'layer' when `sparsity` is a"),
        (dict(sparsity=0.5, scope="layer", schedule="cosine"), ValueError, "`schedule`"),
        (dict(sparsity=0.5, start=5, end=5), ValueError, "`end` to be greater than `start`"),
        (dict(sparsity=0.5, start=-1), ValueError, "`start`"),
        (dict(sparsity=0.5, frequency=0), ValueError, "`frequency`"),
        (dict(sparsity=0.5, interval="batch"), ValueError, "`interval`"),
        (dict(sparsity=0.5, scope="net"), ValueError, "`scope`"),
        (dict(pattern="4:2"), ValueError, "`pattern`"),
        (dict(pattern="2:4", sparsity=0.7), ValueError, "`sparsity` to be None or 0.5"),
        (dict(pattern="2:4", scope="global"), ValueError, "`scope` to be 'layer' with an N:M"),
        (dict(sparsity=0.5, importance="l1"), ValueError, "`importance`"),
        (dict(sparsity=0.5, importance="movement", schedule="one_shot"), ValueError, "`start` to be an int >= 1"),
        (dict(sparsity=0.5, parameters="("), ValueError, "`parameters`"),
        (dict(sparsity=0.5, exclude=[None]), TypeError, "`exclude`"),
        (dict(sparsity=0.5, rewind="yes"), TypeError, "`rewind`"),
        (dict(sparsity=0.5, scope="layer", rewind=True, schedule="one_shot"), ValueError, "`rewind`"),
    ],
)
def test_misconfiguration_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Pruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "model", "overrides", "match"),
    [
        (dict(sparsity=0.5, parameters="decoder"), "mlp", {}, "`parameters` to be patterns that each match"),
        (dict(sparsity=0.5, exclude=["nope"]), "mlp", {}, "`exclude` to be patterns"),
        (dict(sparsity={"nope": 0.5}), "mlp", {}, "`sparsity` to be patterns"),
        (dict(sparsity=0.5, exclude="."), "mlp", {}, "`model` to be a model with at least one"),
        (dict(pattern="2:4"), "cnn", {}, r"stem\.0\.weight` has 1 inputs"),
        (dict(sparsity=0.5, start=50), "mlp", dict(max_epochs=2), "`start` to be before the last optimizer step"),
        (dict(sparsity=0.5, interval="epoch"), "mlp", dict(max_epochs=-1, max_steps=-1, max_time="00:00:00:05"),
         "`end` to be an int when training has no known length"),
    ],
)
def test_misconfiguration_before_any_training_step(tmp_path, kwargs, model, overrides, match):
    counter = StepCounter()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [Pruning(**kwargs, verbose=False), counter], model=model, n=None, **overrides)
    assert counter.batches == 0


def test_verbose_logs_text(tmp_path, caplog):
    with caplog.at_level("INFO"):
        fit(tmp_path, [Pruning(0.5, scope="layer", schedule="one_shot")], max_epochs=1)
    assert "Pruning: step" not in caplog.text  # quiet by default, as Lightning's ModelPruning
    caplog.clear()
    with caplog.at_level("INFO"):
        fit(tmp_path, [Pruning(0.5, scope="layer", schedule="one_shot", verbose=True)], max_epochs=1)
    assert "Pruning: step 0, sparsity 0.5000 over 3 tensors" in caplog.text


class LazyModule(LitClassifier):
    """Builds its layers in `configure_model`, which Lightning calls after the callbacks' `setup`."""

    def __init__(self):
        super().__init__(torch.nn.Identity())

    def configure_model(self):
        if isinstance(self.model, torch.nn.Identity):
            torch.manual_seed(0)
            self.model = ZOO["mlp"].build()


def test_model_built_in_configure_model_and_resumed(tmp_path):
    def run(callbacks, ckpt_path=None):
        return fit(tmp_path, callbacks, max_epochs=3, module=LazyModule(), ckpt_path=ckpt_path)[1]

    cfg = dict(sparsity=0.5, scope="layer", schedule="linear", start=2, frequency=2, verbose=False)
    reference = run([Pruning(**cfg)])
    assert int((reference.model.net[0].weight == 0).sum()) == reference.model.net[0].weight.numel() // 2
    with pytest.raises(Interrupted):
        run([Pruning(**cfg), Crash(5, tmp_path / "cut.ckpt")])
    resumed = run([Pruning(**cfg)], ckpt_path=tmp_path / "cut.ckpt")
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class Dense(torch.nn.Module):
    """A layer with a Linear's interface that is not an nn.Linear: Pruning cannot know its layout."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) * 0.1)

    def forward(self, x):
        return x @ self.weight.t()


def test_default_selection_names_a_layer_kind_it_would_skip(tmp_path):
    module = LitClassifier(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), Dense(8, 4)))
    counter = StepCounter()
    with pytest.raises(ValueError, match=r"Linear's interface .* but got 'model\.2\.weight \(Dense\)'"):
        fit(tmp_path, [Pruning(0.5, verbose=False), counter], module=module, max_epochs=1)
    assert counter.batches == 0
    cb = Pruning(0.5, exclude=r"model\.2\.", scope="layer", schedule="one_shot", verbose=False)  # on purpose
    fit(tmp_path, [cb], module=module, max_epochs=1)
    assert [r.name for r in cb.pruner.refs] == ["model.0.weight"]
