"""`DistillationModule` with Hugging Face models as they are: tiny GPT-2 and BERT configs, random weights, nothing
downloaded. Dict batches, ModelOutputs, the models' own losses, padding masks, the teacher cache, hidden-state
features, and DistilBERT's initialisation."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from litcompress import DistillationModule
from litcompress.distillation import FeatureDistillation, MixupTransfer, TeacherCache, init_from_teacher, kd_loss
from tests.helpers import Crash, Interrupted, RecordingLogger, TeacherCalls
from tests.models import ResumableLoader, trainer_kwargs

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the tiny configs' token ids are outside the tiny vocabulary

VOCAB, LENGTH = 64, 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than two fighting for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_gpt2(one_thread):
    """A 4-layer GPT-2 trained to count (confident predictions to distil); tests take copies."""
    teacher, batch = gpt2(layers=4, seed=1), TokenDicts().batch(64)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        teacher(**batch).loss.backward()
        optimizer.step()
    return teacher.eval()


def gpt2(layers=2, width=32, seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=width, n_layer=layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False))


def bert(layers=4, width=32, seed=0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


class TokenDicts(Dataset):
    """Counting sequences (the next token is learnable), right-padded to ``LENGTH``, as Hugging Face dicts:
    ``labels`` are the tokens with -100 at padding (``"lm"``) or a class per sequence (``"classes"``)."""

    def __init__(self, n=64, kind="lm", seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randperm(VOCAB, generator=g)[:n, None]  # distinct sequences
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n, 1), generator=g)
        self.attention_mask = (torch.arange(LENGTH) < lengths).long()
        self.input_ids = ((start + torch.arange(LENGTH)) % VOCAB) * self.attention_mask  # pad token 0
        self.labels = (self.input_ids.masked_fill(self.attention_mask == 0, -100) if kind == "lm"
                       else start.squeeze(1) % 3)
        self.keys = ("input_ids", "attention_mask", "labels")
        self.tensors = tuple(getattr(self, k) for k in self.keys)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {k: getattr(self, k)[i] for k in self.keys}

    def batch(self, n=16):
        return {k: getattr(self, k)[:n] for k in self.keys}


class DictLoader(ResumableLoader):
    """`ResumableLoader` (exact mid-epoch resumes) yielding dict batches."""

    def __iter__(self):
        for batch in super().__iter__():
            yield dict(zip(self.dataset.keys, batch))


class KeywordsSeen:
    """Records the keyword arguments each forward of ``model`` received."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(lambda _m, _a, kwargs: self.calls.append(set(kwargs)), with_kwargs=True)


def test_fit_on_dict_batches_logs_the_students_own_loss(tmp_path, trained_gpt2):
    teacher, student = copy.deepcopy(trained_gpt2), gpt2(layers=2, seed=2)
    data, batch = TokenDicts(), TokenDicts().batch()
    with torch.no_grad():
        out = student(**batch)
    expected = out.loss  # HF's causal LM loss: shifted labels
    unshifted = F.cross_entropy(out.logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    assert abs(float(unshifted) - float(expected)) > 0.01  # the shift matters: a plain cross entropy would show
    seen_by_teacher, seen_by_student = KeywordsSeen(teacher), KeywordsSeen(student)
    module = DistillationModule(student, teacher, alpha=0.5, lr=1e-2)
    kd_before = module.losses(batch)["kd_loss"].item()
    logger = RecordingLogger()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, logger=logger, log_every_n_steps=1))
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=64))
    first_task_loss = logger.series("train/task_loss")[0][1]
    torch.testing.assert_close(torch.tensor(first_task_loss), expected, rtol=0, atol=1e-6)
    assert module.losses(batch)["kd_loss"].item() < 0.7 * kd_before
    assert seen_by_teacher.calls and all("labels" not in kw for kw in seen_by_teacher.calls)
    assert all(kw == {"input_ids", "attention_mask", "labels"} for kw in seen_by_student.calls)
    assert {"val/acc", "val/f1", "val/loss", "teacher/val/acc", "val/agreement"} <= set(trainer.callback_metrics)


def test_labels_reach_the_student_only_for_its_own_loss():
    teacher, student = gpt2(layers=2, seed=1), gpt2(layers=1, seed=2)
    seen = KeywordsSeen(student)
    batch = TokenDicts().batch(4)
    free = DistillationModule(student, teacher, alpha=1.0)  # no task term: the student's loss would be wasted
    assert "task_loss" not in free.losses(batch) and "labels" not in seen.calls[-1]
    mse = DistillationModule(student, teacher, task_loss="mse", alpha=0.5)
    assert mse.student_inputs({"input_ids": batch["input_ids"]}, batch["labels"]) == {"input_ids": batch["input_ids"]}


class OwnLoss(torch.nn.Module):
    """Returns a mapping with ``logits`` and, given ``labels``, its own loss: cross entropy plus ``extra``."""

    def __init__(self, extra=None):
        super().__init__()
        self.embed, self.head, self.extra = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB), extra

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        if labels is None or self.extra is None:
            return {"logits": logits}
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + self.extra}


def test_the_students_own_loss_is_the_task_loss_when_it_returns_one():
    batch = TokenDicts().batch(8)
    for extra in (1.0, None):
        torch.manual_seed(0)
        student = OwnLoss(extra)
        parts = DistillationModule(student, OwnLoss(), alpha=0.5).losses(batch)
        logits = student(batch["input_ids"])["logits"]
        plain = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())  # not a causal LM: no shift
        torch.testing.assert_close(parts["task_loss"], plain + (extra or 0.0))
        torch.testing.assert_close(parts["loss"], 0.5 * parts["kd_loss"] + 0.5 * parts["task_loss"])


def test_validation_compares_shifted_labels_for_causal_lms_and_labels_as_they_are_otherwise(tmp_path):
    data, batch = TokenDicts(), TokenDicts().batch(64)
    teacher, student = gpt2(layers=2, seed=1), gpt2(layers=1, seed=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    metrics = trainer.validate(DistillationModule(student, teacher), DataLoader(data, batch_size=64), verbose=False)[0]
    with torch.no_grad():
        s, t = student(**batch), teacher(**batch)
    labels, valid = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    expected_acc = (s.logits[:, :-1].argmax(-1) == labels)[valid].float().mean()
    assert metrics["val/acc"] == pytest.approx(float(expected_acc), abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(float(s.loss), abs=1e-5)  # the student's own loss
    assert metrics["teacher/val/loss"] == pytest.approx(float(t.loss), abs=1e-5)  # shifted as HF shifts
    positions = (batch["attention_mask"] == 1) & F.pad(valid, (0, 1))  # as KD: real tokens with a next label
    agree = (s.logits.argmax(-1) == t.logits.argmax(-1))[positions].float().mean()
    assert metrics["val/agreement"] == pytest.approx(float(agree), abs=1e-6)

    classes = TokenDicts(kind="classes")
    student, teacher = bert(layers=1, seed=2), bert(layers=2, seed=1)
    metrics = trainer.validate(DistillationModule(student, teacher), DataLoader(classes, batch_size=64),
                               verbose=False)[0]
    with torch.no_grad():
        out = student(**classes.batch(64))
    assert metrics["val/acc"] == pytest.approx(float((out.logits.argmax(-1) == classes.labels).float().mean()))
    assert metrics["val/loss"] == pytest.approx(float(out.loss), abs=1e-5)


def test_tuple_batches_and_ensembles_of_models_returning_model_outputs(tmp_path):
    data = TokenDicts(kind="classes")
    student, teachers = bert(layers=1, seed=2), [bert(layers=2, seed=1), bert(layers=2, seed=3)]
    module = DistillationModule(student, teachers, alpha=0.5)
    ids, labels = data.input_ids[:16], data.labels[:16]
    parts = module.losses((ids, labels))
    logits = student(ids).logits
    torch.testing.assert_close(parts["task_loss"], F.cross_entropy(logits, labels))
    with torch.no_grad():
        p = sum(F.softmax(t(ids).logits / 4, -1) for t in teachers) / 2
    expected_kd = (p * (p.log() - F.log_softmax(logits / 4, -1))).sum(-1).mean() * 16
    torch.testing.assert_close(parts["kd_loss"], expected_kd)
    pairs = DataLoader(torch.utils.data.TensorDataset(data.input_ids, data.labels), batch_size=16)
    (trainer := pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1))).fit(module, pairs, pairs)
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0


@pytest.mark.parametrize("labels", ["shifted", "aligned", "none"])
def test_kd_ignores_padding_and_ignored_labels(labels, trained_gpt2):
    teacher, student = trained_gpt2, gpt2(layers=1, seed=2)
    module = DistillationModule(student, teacher, alpha=1.0, task_loss=None, shift_labels=labels == "shifted")
    batch = TokenDicts().batch(8)
    padding = batch["attention_mask"] == 0
    batch["labels"] = batch["input_ids"].clone()  # padding is known from the attention mask only
    batch["labels"][:, :2] = -100  # a prompt: its tokens are not predicted
    if labels == "none":
        del batch["labels"]
    changed = dict(batch, input_ids=batch["input_ids"].masked_fill(padding, 7))
    with torch.no_grad():
        s, t, s2 = student(**batch).logits, teacher(**batch).logits, student(**changed).logits
    assert padding.any() and not torch.allclose(s[padding], s2[padding])  # the padded positions' logits changed
    loss, loss_changed = module.losses(batch)["kd_loss"], module.losses(changed)["kd_loss"]
    torch.testing.assert_close(loss, loss_changed, rtol=0, atol=1e-6)
    counted = ~padding
    if labels != "none":
        target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100) if labels == "shifted" else batch["labels"]
        counted &= target != -100
    torch.testing.assert_close(loss, kd_loss(s[counted], t[counted], 4.0))
    assert abs(kd_loss(s, t, 4.0).item() - loss.item()) > 0.01  # unmasked, the loss would differ


def test_teacher_cache_with_dict_batches(tmp_path):
    data = TokenDicts()

    def run(cache):
        teacher, student = gpt2(layers=2, seed=1), gpt2(layers=1, seed=2)
        calls = TeacherCalls(teacher)
        module = DistillationModule(student, teacher, alpha=0.5, cache=cache)
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3), callbacks=[calls]).fit(
            module, DataLoader(data, batch_size=16))
        return module, calls.per_epoch

    cached, calls = run(True)
    assert calls[0] == 4 and calls.get(1, 0) == 0 and calls.get(2, 0) == 0  # the teacher runs in epoch 1 only
    assert len(cached.teacher_cache.store) == 64
    plain, _ = run(False)
    for a, b in zip(cached.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # float32 cache: exactly the teacher's targets


@pytest.mark.parametrize("cut", [2, "epoch", 6])  # mid first epoch, its end, mid second epoch
@pytest.mark.parametrize("storage", [{}, {"top_k": 4}], ids=["float32", "top_k"])
def test_resume_with_dict_batches_and_cache_is_bit_identical(tmp_path, cut, storage):
    data = TokenDicts()

    def run(callbacks, ckpt_path=None, max_epochs=3, **overrides):
        teacher, student = gpt2(layers=2, seed=1), gpt2(layers=1, seed=2)
        module = DistillationModule(student, teacher, alpha=0.5, cache=TeacherCache(**storage))
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, **overrides), callbacks=callbacks)
        trainer.fit(module, DictLoader(data, 16), ckpt_path=ckpt_path)
        return module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = run([])
        if cut == "epoch":
            run([ModelCheckpoint(dirpath=tmp_path, filename="cut")], max_epochs=1, enable_checkpointing=True)
        else:
            with pytest.raises(Interrupted):
                run([Crash(cut, tmp_path / "cut.ckpt")])
        resumed = run([], ckpt_path=tmp_path / "cut.ckpt")
    assert not [w for w in caught if "Teacher cache" in str(w.message)]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(resumed.teacher_cache.store) == 64


def test_hidden_state_feature_kd_between_gpt2_widths(tmp_path):
    teacher, student = gpt2(layers=4, width=32, seed=1), gpt2(layers=2, width=16, seed=2)
    pairs = {"transformer.h.0": "transformer.h.1", "student.transformer.h.1": "teacher.transformer.h.3"}
    module = DistillationModule(student, teacher, lr=3e-3, features=FeatureDistillation(pairs, weight=10.0))
    assert set(module.adapters) == {"transformer__h__0", "transformer__h__1"}
    assert module.adapters["transformer__h__1"].proj.weight.shape == (32, 16)
    adapter_before = module.adapters["transformer__h__1"].proj.weight.clone()
    data, batch = TokenDicts(), TokenDicts().batch()
    before = module.losses(batch)
    assert before["feature_loss"] > 0
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(module, DataLoader(data, batch_size=16))
    assert module.losses(batch)["feature_loss"] < 0.85 * before["feature_loss"]
    assert not torch.equal(module.adapters["transformer__h__1"].proj.weight, adapter_before)  # trained
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in module.adapters.parameters())


def test_hidden_state_feature_kd_between_berts():
    data = TokenDicts(kind="classes")
    teacher, student = bert(layers=4, width=32, seed=1), bert(layers=2, width=16, seed=2)
    module = DistillationModule(student, teacher, features={"bert.encoder.layer.1": "bert.encoder.layer.3",
                                                            "bert.embeddings": "bert.embeddings"})
    assert module.adapters["bert__encoder__layer__1"].proj.weight.shape == (32, 16)
    parts = module.losses(data.batch())
    parts["loss"].backward()
    assert parts["feature_loss"] > 0 and module.adapters["bert__encoder__layer__1"].proj.weight.grad is not None
    with pytest.raises(ValueError, match=r"names of teacher layers, but got 'bert.encoder.layer.4'"):
        DistillationModule(student, teacher, features={"bert.encoder.layer.1": "bert.encoder.layer.4"})


def test_init_from_teacher_bert_copies_every_other_layer():
    teacher, student = bert(layers=4, seed=1), bert(layers=2, seed=2)
    copied = init_from_teacher(student, teacher)
    assert copied["bert.encoder.layer.1.attention.self.key.bias"] == "bert.encoder.layer.2.attention.self.key.bias"
    assert copied["bert.embeddings.word_embeddings.weight"] == "bert.embeddings.word_embeddings.weight"
    assert copied["classifier.weight"] == "classifier.weight"
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert set(copied) == set(s_state)  # every student tensor has a teacher counterpart
    assert all(torch.equal(s_state[k], t_state[v]) for k, v in copied.items())
    assert not torch.equal(s_state["bert.encoder.layer.1.output.dense.weight"],
                           t_state["bert.encoder.layer.1.output.dense.weight"])  # layer 1 is teacher layer 2
    chosen = bert(layers=2, seed=3)
    init_from_teacher(chosen, teacher, layer_map=[3, 1])
    assert torch.equal(chosen.bert.encoder.layer[0].output.dense.weight,
                       teacher.bert.encoder.layer[3].output.dense.weight)


def test_init_from_teacher_gpt2_starts_lower_than_random(trained_gpt2):
    batch, teacher = TokenDicts().batch(64), trained_gpt2
    student, random_student = gpt2(layers=2, seed=2), gpt2(layers=2, seed=2)
    copied = init_from_teacher(student, teacher)
    assert copied["transformer.h.1.mlp.c_fc.weight"] == "transformer.h.2.mlp.c_fc.weight"
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    with torch.no_grad():
        initialised, random = student(**batch).loss, random_student(**batch).loss
    assert initialised < 0.5 * random, (float(initialised), float(random))


def test_init_from_teacher_refuses_what_it_cannot_copy():
    teacher = bert(layers=4, seed=1)
    with pytest.raises(ValueError, match=r"`layer_map` to be student layer indices in \[0, 2\) mapped to teacher "
                                         r"layer indices in \[0, 4\) of `bert.encoder.layer`, but got \[0, 7\]"):
        init_from_teacher(bert(layers=2), teacher, layer_map=[0, 7])
    with pytest.raises(TypeError, match="`layer_map` to be a list or a mapping"):
        init_from_teacher(bert(layers=2), teacher, layer_map="0,2")
    narrow = bert(layers=2, width=16)
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(ValueError, match=r"`student` to be a model with the teacher's widths .*"
                                         r"bert.embeddings.word_embeddings.weight \(64, 16\) vs"):
        init_from_teacher(narrow, teacher)
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())  # nothing half-copied
    with pytest.raises(ValueError, match="at most the teacher's 4 layers"):
        init_from_teacher(bert(layers=6), teacher)
    with pytest.raises(ValueError, match="`layer_map` to be None when no layer list"):
        init_from_teacher(bert(layers=4), teacher, layer_map=[0, 1, 2, 3])
    with pytest.raises(TypeError, match=r"`student` to be a torch\.nn\.Module"):
        init_from_teacher("bert", teacher)


class TupleOut(torch.nn.Linear):
    """A model returning ``(logits, inputs)``: no `logits` to find."""

    def forward(self, x):
        return super().forward(x), x


class FirstItem(DistillationModule):
    def logits(self, output):
        return output[0] if isinstance(output, tuple) else super().logits(output)


def test_misconfiguration_and_the_logits_hook():
    teacher, student = TupleOut(8, 3), TupleOut(8, 3)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    with pytest.raises(TypeError, match=r"returned a tuple, .* override `DistillationModule.logits\(output\)`"):
        DistillationModule(student, teacher).losses((x, y))
    parts = FirstItem(student, teacher, alpha=0.5).losses((x, y))  # the documented hook
    torch.testing.assert_close(parts["task_loss"], F.cross_entropy(student(x)[0], y))
    with pytest.raises(TypeError, match="`shift_labels` to be a bool or None"):
        DistillationModule(gpt2(layers=1), gpt2(layers=2), shift_labels="yes")
    assert DistillationModule(gpt2(layers=1), gpt2(layers=2)).shift_labels
    assert not DistillationModule(bert(layers=1), bert(layers=2)).shift_labels
    unlabeled = {k: v for k, v in TokenDicts().batch(4).items() if k != "labels"}
    with pytest.raises(ValueError, match=r"A batch without targets.*\(alpha < 1\) in `DistillationModule.losses`"):
        DistillationModule(gpt2(layers=1), gpt2(layers=2)).losses(unlabeled)
    mixup = DistillationModule(gpt2(layers=1), gpt2(layers=2), transfer=MixupTransfer())
    with pytest.raises(ValueError, match=r"MixupTransfer\(size=64, seed=0\) got inputs that are not one floating"):
        mixup.losses(TokenDicts().batch(4))
