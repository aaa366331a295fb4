"""`DistillationModule` through real `Trainer.fit` runs."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from litcompress import DistillationModule, Pruning, QuantizationAwareTraining
from litcompress.distillation import FeatureDistillation, MixupTransfer, TeacherCache, kd_loss
from tests.helpers import Crash, Interrupted, RecordingLogger, TeacherCalls, fit
from tests.models import MLP, TinyGPT, classification_data, lm_data, trainer_kwargs


def teacher_and_student(seed=0):
    torch.manual_seed(seed)
    return MLP(16, 64), MLP(16, 8)


class TeacherWatch(pl.Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.modes.append(pl_module.teacher.training)


def test_teacher_frozen_outside_checkpoint_and_optimizer(tmp_path):
    teacher, student = teacher_and_student()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(student, teacher)
    watch = TeacherWatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [watch, ModelCheckpoint(dirpath=tmp_path, save_last=True)], module=module,
                         max_epochs=2, enable_checkpointing=True)
    assert not any("eval mode" in str(w.message) for w in caught)
    assert watch.modes and not any(watch.modes)  # eval mode at every training step
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in trainer.optimizers[0].param_groups for p in g["params"])
    keys = list(torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"])
    assert keys and all(k.startswith("student.") for k in keys)
    # inference from the checkpoint needs no teacher
    restored = DistillationModule.load_from_checkpoint(tmp_path / "last.ckpt", student=MLP(16, 8), teacher=None)
    x = classification_data((16,)).tensors[0][:4]
    torch.testing.assert_close(restored(x), module(x))


def test_loss_is_hinton_mix_and_parts_are_logged(tmp_path):
    teacher, student = teacher_and_student()
    module = DistillationModule(student, teacher, temperature=3.0, alpha=0.7)
    x, y = classification_data((16,)).tensors
    parts = module.losses((x[:16], y[:16]))
    s, t = student(x[:16]), teacher(x[:16]).detach()
    p_t = F.softmax(t / 3.0, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3.0, -1))).sum(-1).mean() * 9.0
    ce = F.cross_entropy(s, y[:16])
    torch.testing.assert_close(parts["kd_loss"], kl)
    torch.testing.assert_close(parts["loss"], 0.7 * kl + 0.3 * ce)
    logger = RecordingLogger()
    fit(tmp_path, [], module=module, max_epochs=1, logger=logger, log_every_n_steps=1)
    logged = set().union(*(m.keys() for _, m in logger.records))
    assert {"train/kd_loss", "train/task_loss", "train/loss", "val/acc", "val/agreement"} <= logged


def test_sequence_kd_masks_padding(tmp_path):
    torch.manual_seed(0)
    teacher, student = TinyGPT(layers=2), TinyGPT(layers=1)
    module = DistillationModule(student, teacher, ignore_index=-100)
    idx, targets = lm_data(n=4).tensors
    targets = targets.clone()
    targets[:, -3:] = -100  # padding
    parts = module.losses((idx, targets))
    s, t = student(idx), teacher(idx).detach()
    mask = targets != -100
    torch.testing.assert_close(parts["kd_loss"], kd_loss(s[mask], t[mask], 4.0))
    data = DataLoader(lm_data(), batch_size=16)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(module, data, data)
    assert 0.0 <= float(trainer.callback_metrics["val/agreement"]) <= 1.0


def test_regression_mse_and_label_free(tmp_path):
    torch.manual_seed(0)
    teacher, student = MLP(16, 32, num_classes=3), MLP(16, 8, num_classes=3)
    x = torch.randn(64, 16)
    y = teacher(x).detach() + 0.01 * torch.randn(64, 3)
    module = DistillationModule(student, teacher, task_loss="mse", alpha=0.5)
    parts = module.losses((x, y))
    torch.testing.assert_close(parts["kd_loss"], F.mse_loss(student(x), teacher(x).detach()))
    free = DistillationModule(MLP(16, 8), MLP(16, 32), task_loss=None, alpha=1.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3))
    before = free.losses((x,))["loss"].item()
    trainer.fit(free, DataLoader(TensorDataset(x), batch_size=16))  # inputs only: no labels anywhere
    assert free.losses((x,))["loss"].item() < before


def test_callbacks_compress_only_the_student(tmp_path):
    teacher, student = teacher_and_student()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    prune = Pruning(0.5, scope="layer", schedule="one_shot", verbose=False)
    qat = QuantizationAwareTraining(verbose=False)
    fit(tmp_path, [prune, qat], module=DistillationModule(student, teacher), max_epochs=1)
    assert all(r.name.startswith("net.") for r in prune.pruner.refs)  # names relative to the student
    assert int((student.net[0].weight == 0).sum()) == student.net[0].weight.numel() // 2
    assert type(student.net[0]).__name__ == "QATLinear" and type(teacher.net[0]).__name__ == "Linear"
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())


def resumed_matches_uninterrupted(tmp_path, cut, **kwargs):
    """Fit 3 epochs; crash at step `cut` (or stop after the first epoch, `cut="epoch"`, with a ModelCheckpoint saved
    at its validation's end) and resume; the two students must be bit-identical. Returns (uninterrupted, resumed)."""

    def run(callbacks, ckpt_path=None, **overrides):
        teacher, student = teacher_and_student()
        overrides = {"max_epochs": 3, **overrides}
        return fit(tmp_path, callbacks, module=DistillationModule(student, teacher, **kwargs), ckpt_path=ckpt_path,
                   **overrides)[1]

    reference = run([])
    if cut == "epoch":
        checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="cut", save_on_train_epoch_end=False)
        run([checkpoint], max_epochs=1, enable_checkpointing=True)
    else:
        with pytest.raises(Interrupted):
            run([Crash(cut, tmp_path / "cut.ckpt")])
    resumed = run([], ckpt_path=tmp_path / "cut.ckpt")
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    return reference, resumed


@pytest.mark.parametrize("cut", [3, 8])
def test_resume_is_bit_identical(tmp_path, cut):
    resumed_matches_uninterrupted(tmp_path, cut)


def test_bf16_mixed(tmp_path):
    teacher, student = teacher_and_student()
    trainer, _ = fit(tmp_path, [], module=DistillationModule(student, teacher), max_epochs=1, precision="bf16-mixed")
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/acc"])))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(temperature=0), ValueError, "`temperature` to be a float > 0"),
        (dict(temperature=-1.0), ValueError, "`temperature`"),
        (dict(alpha=1.5), ValueError, r"`alpha` to be a float in the \[0, 1\] range"),
        (dict(task_loss=None, alpha=0.5), ValueError, "`alpha` to be 1.0 when `task_loss` is None"),
        (dict(task_loss="hinge"), ValueError, "`task_loss`"),
        (dict(lr=0), ValueError, "`lr`"),
        (dict(weight_decay=-0.1), ValueError, "`weight_decay`"),
        (dict(ignore_index=1.5), TypeError, "`ignore_index`"),
        (dict(num_classes=1), ValueError, "`num_classes`"),
    ],
)
def test_misconfiguration_at_construction(kwargs, exc, match):
    teacher, student = teacher_and_student()
    with pytest.raises(exc, match=match):
        DistillationModule(student, teacher, **kwargs)


def test_misconfiguration_of_models(tmp_path):
    teacher, student = teacher_and_student()
    with pytest.raises(TypeError, match="`student`"):
        DistillationModule("student", teacher)
    with pytest.raises(ValueError, match="a model other than the student"):
        DistillationModule(student, student)
    with pytest.raises(ValueError, match="`teacher` to be a teacher model for training"):
        fit(tmp_path, [], module=DistillationModule(student, None), max_epochs=1)
    mismatched = DistillationModule(MLP(16, 8, num_classes=4), MLP(16, 8, num_classes=5))
    before = [p.clone() for p in mismatched.parameters()]
    with pytest.raises(ValueError, match=r"outputs shaped like the student's \(16, 4\), but got \(16, 5\)"):
        fit(tmp_path, [], module=mismatched, max_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, mismatched.parameters()))  # no step was taken


def conv_pair(seed=0):
    from tests.models import ConvNet

    torch.manual_seed(seed)
    return ConvNet(width=16), ConvNet(width=8)


@pytest.mark.parametrize("kind", ["mse", "cosine", "attention"])
def test_feature_distillation_with_adapters(tmp_path, kind):
    teacher, student = conv_pair()
    pairs = {"student.stem.0": "teacher.stem.0", "block.3": "block.3"}
    module = DistillationModule(student, teacher, features=FeatureDistillation(pairs, loss=kind, weight=2.0))
    if kind == "attention":
        assert len(module.adapters) == 0  # spatial attention maps need no width adapter
    else:
        assert set(module.adapters) == {"stem__0", "block__3"}
        assert module.adapters["stem__0"].proj.weight.shape == (16, 8)
    x, y = classification_data((1, 8, 8)).tensors
    first = module.losses((x, y))
    assert first["feature_loss"] > 0
    torch.testing.assert_close(first["loss"], 0.9 * first["kd_loss"] + 0.1 * first["task_loss"]
                               + 2.0 * first["feature_loss"])
    trainer, _ = fit(tmp_path, [ModelCheckpoint(dirpath=tmp_path, save_last=True)], module=module, model="cnn",
                     n=None, max_epochs=4, enable_checkpointing=True)
    assert module.losses((x, y))["feature_loss"] < first["feature_loss"]  # the student's features moved closer
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in module.adapters.parameters())
    keys = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert all(k.startswith(("student.", "adapters.")) for k in keys)
    assert any(k.startswith("adapters.") for k in keys) == (kind != "attention")


def test_feature_names_and_widths_are_checked():
    teacher, student = conv_pair()
    with pytest.raises(ValueError, match=r"names of student layers, but got 'stem\.9'. HINT: the student's layers"):
        DistillationModule(student, teacher, features={"stem.9": "stem.0"})
    with pytest.raises(ValueError, match="names of teacher layers, but got 'nope'"):
        DistillationModule(student, teacher, features={"stem.0": "nope"})
    with pytest.raises(ValueError, match="`loss`"):
        FeatureDistillation({"stem.0": "stem.0"}, loss="l1")
    with pytest.raises(ValueError, match="`weight`"):
        FeatureDistillation({"stem.0": "stem.0"}, weight=-1)
    with pytest.raises(TypeError, match="`features`"):
        DistillationModule(student, teacher, features=["stem.0"])
    with pytest.raises(ValueError, match="layers whose output width is known"):
        DistillationModule(student, teacher, features={"block": "block"})  # a Sequential: width unknown


def test_label_free_distillation_from_random_inputs(tmp_path):
    from litcompress.data import RandomInputs

    torch.manual_seed(0)
    data = classification_data((16,), n=256)
    teacher_module = fit(tmp_path, [], module=None, model="mlp", n=256, max_epochs=10, lr=0.05)[1]
    teacher = teacher_module.model
    x, _ = data.tensors

    def agreement(student):
        with torch.no_grad():
            return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    torch.manual_seed(1)
    student = MLP(16, 32)
    untrained = agreement(student)
    inputs = RandomInputs((16,), size=2048, distribution="matched", reference=x[:64], seed=0)
    module = DistillationModule(student, teacher, task_loss=None, alpha=1.0, lr=3e-3, temperature=2.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=6))
    trainer.fit(module, DataLoader(inputs, batch_size=64))  # no labels, no real training data
    assert agreement(student) > max(0.85, untrained + 0.3), (untrained, agreement(student))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(shape=16), TypeError, "`shape`"),
        (dict(shape=(16,), size=0), ValueError, "`size`"),
        (dict(shape=(16,), distribution="normal"), ValueError, "`distribution`"),
        (dict(shape=(16,), distribution="matched"), ValueError, "`reference`"),
        (dict(shape=(16,), distribution="matched", reference=torch.zeros(4, 8)), ValueError, "`reference`"),
        (dict(shape=(16,), distribution="uniform", low=1.0, high=1.0), ValueError, "`high`"),
        (dict(shape=(8,), distribution="tokens"), TypeError, "`vocab_size`"),
    ],
)
def test_random_inputs_misconfiguration(kwargs, exc, match):
    from litcompress.data import RandomInputs

    with pytest.raises(exc, match=match):
        RandomInputs(**kwargs)


def test_random_tokens_for_language_models():
    from litcompress.data import RandomInputs

    ds = RandomInputs((8,), size=10, distribution="tokens", vocab_size=32)
    assert ds[3].dtype == torch.long and int(ds[3].max()) < 32 and torch.equal(ds[3], ds[3])


def test_teacher_cache_hits_and_matches_uncached(tmp_path):
    def run(cache):
        teacher, student = teacher_and_student()
        calls = TeacherCalls(teacher)
        module = DistillationModule(student, teacher, cache=cache)
        fit(tmp_path, [calls], module=module, max_epochs=3)
        return module, calls.per_epoch

    cached, calls = run(True)
    assert calls[0] == 4 and calls.get(1, 0) == 0 and calls.get(2, 0) == 0  # the teacher is not called again
    assert len(cached.teacher_cache.store) == 64
    plain, _ = run(False)
    for a, b in zip(cached.parameters(), plain.parameters()):
        assert torch.equal(a, b)  # float32 cache: exactly the targets the teacher would give


class Augmented(torch.utils.data.Dataset):
    def __init__(self, data):
        self.x, self.y = data.tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]  # a new view every time


def test_teacher_cache_detects_augmentation(tmp_path):
    teacher, student = teacher_and_student()
    calls = TeacherCalls(teacher)
    module = DistillationModule(student, teacher, cache=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3), callbacks=[calls])
    data = DataLoader(Augmented(classification_data((16,), n=64)), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match=r"Teacher cache: only 0% .* \(random augmentation\?\)"):
        trainer.fit(module, data)
    assert not module.teacher_cache.enabled and not module.teacher_cache.store
    assert calls.per_epoch[1] == 4 and calls.per_epoch[2] == 4  # fresh targets for every augmented batch


@pytest.mark.parametrize("cut", [4, "epoch", 6])  # the first epoch's last step, its end, the second's middle
@pytest.mark.parametrize("in_checkpoint", [False, True])
@pytest.mark.parametrize("storage", [{}, {"dtype": torch.float16}, {"top_k": 2}],
                         ids=["float32", "float16", "top_k"])
def test_resume_with_cache_is_bit_identical(tmp_path, cut, in_checkpoint, storage):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference, resumed = resumed_matches_uninterrupted(
            tmp_path, cut, cache=TeacherCache(in_checkpoint=in_checkpoint, **storage))
    assert not [w for w in caught if "Teacher cache" in str(w.message)]  # no augmentation suspected
    cache = resumed.teacher_cache
    assert cache.enabled and len(cache.store) == 64 and cache.bytes == reference.teacher_cache.bytes
    if in_checkpoint:  # the restored statistics go on as in the uninterrupted fit
        assert cache.passes == reference.teacher_cache.passes == 3


def test_cache_misconfiguration():
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match="`cache` to be False with `features`"):
        DistillationModule(student, teacher, features={"net.0": "net.0"}, cache=True)
    with pytest.raises(TypeError, match="`cache` to be a bool or a TeacherCache"):
        DistillationModule(student, teacher, cache="yes")
    with pytest.raises(ValueError, match=r"Expected argument `max_bytes` to be an int >= 1, but got 0"):
        TeacherCache(max_bytes=0)
    with pytest.raises(ValueError, match=r"Expected argument `dtype` to be one of 'float32'"):
        TeacherCache(dtype="float8")
    with pytest.raises(TypeError, match=r"Expected argument `in_checkpoint` to be a bool, but got 'yes'"):
        TeacherCache(in_checkpoint="yes")
    with pytest.raises(ValueError, match=r"`cache` to be a TeacherCache whose temperature is the distillation"):
        DistillationModule(student, teacher, temperature=4.0, cache=TeacherCache(top_k=2, temperature=2.0))


def test_teacher_ensemble_averages_softened_probabilities(tmp_path):
    torch.manual_seed(0)
    t1, t2, student = MLP(16, 64), MLP(16, 32), MLP(16, 8)
    module = DistillationModule(student, [t1, t2], temperature=2.0, cache=True)
    x, y = (t[:16] for t in classification_data((16,)).tensors)
    parts = module.losses((x, y))
    p = (F.softmax(t1(x).detach() / 2, -1) + F.softmax(t2(x).detach() / 2, -1)) / 2
    expected = (p * (p.log() - F.log_softmax(student(x) / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(parts["kd_loss"], expected)
    fit(tmp_path, [], module=module, max_epochs=2)
    assert not any(k.startswith(("teacher", "members")) for k in module.state_dict())
    assert all(not p.requires_grad for p in t1.parameters()) and not t2.training
    with pytest.raises(TypeError, match="a module or a list of two or more modules"):
        DistillationModule(MLP(16, 8), [t1])
    with pytest.raises(ValueError, match=r"members returned outputs of different shapes .* in `TeacherEnsemble`"):
        DistillationModule(MLP(16, 8), [t1, MLP(16, 8, num_classes=3)]).losses((x, y))


def test_mixup_transfer_set(tmp_path):
    teacher, student = teacher_and_student()
    module = DistillationModule(student, teacher, transfer=MixupTransfer(size=32, seed=3))
    x, y = (t[:16] for t in classification_data((16,)).tensors)
    mixed = module.mixup_inputs(x)
    assert mixed.shape == (32, 16) and torch.equal(mixed, module.mixup_inputs(x))  # seeded: reproducible
    lo, hi = x.min(0).values, x.max(0).values
    assert ((mixed >= lo - 1e-6) & (mixed <= hi + 1e-6)).all()  # convex mixes stay within the batch's range
    module.train()
    parts = module.losses((x, y))
    expected = kd_loss(student(mixed), teacher(mixed).detach(), 4.0)
    torch.testing.assert_close(parts["transfer_loss"], expected)
    torch.testing.assert_close(parts["loss"], 0.9 * parts["kd_loss"] + 0.1 * parts["task_loss"]
                               + 0.9 * parts["transfer_loss"])
    module.eval()
    assert "transfer_loss" not in module.losses((x, y))  # only in training


@pytest.mark.parametrize("cut", [3, 6])
def test_resume_with_transfer_is_bit_identical(tmp_path, cut):
    resumed_matches_uninterrupted(tmp_path, cut, transfer=MixupTransfer(size=8))


def test_transfer_misconfiguration(tmp_path):
    teacher, student = teacher_and_student()
    with pytest.raises(TypeError, match="`transfer` to be None or a MixupTransfer"):
        DistillationModule(student, teacher, transfer="mixup")
    with pytest.raises(ValueError, match="`size`"):
        MixupTransfer(size=0)
    gpt = DistillationModule(TinyGPT(layers=1), TinyGPT(layers=2), transfer=MixupTransfer())
    with pytest.raises(ValueError, match=r"not one floating-point tensor.*`DistillationModule.mixup_inputs`"):
        gpt.mixup_inputs(lm_data(n=4).tensors[0])
