"""`TeacherCache` and its top-k storage: exact kept probabilities, memory, and a real fit on a language model."""

from __future__ import annotations

import hashlib
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from litcompress import DistillationModule
from litcompress.distillation import TeacherCache, split_batch, topk_compress, topk_expand
from tests.helpers import TeacherCalls, fit
from tests.models import MLP, TinyGPT, classification_data, lm_data, trainer_kwargs


@settings(max_examples=40, deadline=None)
@given(classes=st.integers(2, 300), k=st.integers(1, 40), temperature=st.floats(0.5, 8.0), seed=st.integers(0, 99))
def test_topk_keeps_exact_probabilities_and_spreads_the_rest(classes, k, temperature, seed):
    logits = 3 * torch.randn(5, 3, classes, generator=torch.Generator().manual_seed(seed))
    parts = topk_compress(logits, k, temperature, torch.float32)
    expanded = topk_expand(*parts, classes=classes)
    assert expanded.shape == logits.shape and expanded.dtype == torch.float32
    p, q = (F.softmax(t / temperature, -1) for t in (logits, expanded))
    kept = parts[1].long()
    torch.testing.assert_close(q.gather(-1, kept), p.gather(-1, kept), atol=1e-5, rtol=1e-4)
    assert torch.equal(expanded.argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(q.sum(-1), torch.ones(5, 3))
    if k < classes:  # the other classes share the remaining mass evenly
        rest = torch.ones_like(q, dtype=torch.bool).scatter(-1, kept, False)
        others = q[rest].view(5, 3, classes - k)
        torch.testing.assert_close(others, others[..., :1].expand_as(others), atol=1e-6, rtol=1e-4)
    else:
        torch.testing.assert_close(expanded, logits)


def test_topk_storage_is_compact():
    vocab, k = 50_000, 32
    values, indices, fill = topk_compress(torch.randn(2, vocab), k, 4.0)
    assert (values.dtype, indices.dtype, fill.dtype) == (torch.float16, torch.int32, torch.float16)
    per_row = sum(t[0].numel() * t.element_size() for t in (values, indices, fill))
    assert per_row == k * 2 + k * 4 + 2 and per_row < vocab * 4 / 1000
    assert topk_compress(torch.randn(2, 100), 8)[1].dtype == torch.int16


def fit_gpt(tmp_path, epochs=2, **options):
    torch.manual_seed(0)
    teacher, student = TinyGPT(layers=2), TinyGPT(layers=1)
    calls = TeacherCalls(teacher)
    module = DistillationModule(student, teacher, cache=TeacherCache(**options))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs), callbacks=[calls])
    trainer.fit(module, DataLoader(lm_data(n=64), batch_size=16))
    return module, teacher, calls.per_epoch


def test_topk_cache_in_a_fit_on_token_logits(tmp_path):
    k = 4
    module, teacher, calls = fit_gpt(tmp_path, top_k=k, dtype=torch.float16)
    assert calls[0] == 4 and calls.get(1, 0) == 0  # the teacher is not called in epoch 2
    cache = module.teacher_cache
    distinct = len(torch.unique(lm_data(n=64).tensors[0], dim=0))  # repeated sequences are stored once
    assert len(cache.store) == distinct and cache.bytes == distinct * 8 * (k * 2 + k * 2 + 2)  # 8 tokens each
    # the stored targets give the teacher's own top-k probabilities at the distillation temperature
    idx = lm_data(n=64).tensors[0][:16]
    cached = cache.lookup(cache.keys(idx))
    with torch.no_grad():
        p = F.softmax(teacher(idx) / module.temperature, -1)
    q = F.softmax(cached / module.temperature, -1)
    top = p.topk(k, -1).indices
    torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), atol=2e-3, rtol=2e-2)  # float16 storage
    assert torch.equal(cached.argmax(-1), p.argmax(-1))


def test_full_width_topk_matches_the_plain_cache(tmp_path):
    topk, _, _ = fit_gpt(tmp_path, epochs=3, top_k=32)  # vocab 32: nothing dropped, float32: exact
    plain, _, _ = fit_gpt(tmp_path, epochs=3)
    for a, b in zip(topk.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_topk_cache_round_trips_through_state_dict():
    cache = TeacherCache(top_k=2, temperature=2.0)
    x, logits = torch.randn(3, 5), torch.randn(3, 6)
    cache.add(cache.keys(x), logits)
    other = TeacherCache(top_k=2, temperature=2.0)
    other.load_state_dict(cache.state_dict())
    assert other.bytes == cache.bytes == 3 * (2 * 4 + 2 * 2 + 4)
    torch.testing.assert_close(other.lookup(other.keys(x)), cache.lookup(cache.keys(x)))
    with pytest.raises(ValueError, match=r"Expected argument `top_k` to be 2, as in the checkpoint"):
        TeacherCache(top_k=None).load_state_dict(cache.state_dict())
    TeacherCache(top_k=None).load_state_dict(cache.state_dict(contents=False))  # no contents: no layout to keep


def test_memory_bound_leaves_the_rest_to_the_teacher():
    cache = TeacherCache(max_bytes=2 * 10 * 4, dtype=torch.float16)  # room for four rows of 10 float16 logits
    x, logits = torch.randn(5, 4), 100 * torch.randn(5, 10)
    targets = cache.add(cache.keys(x), logits)
    assert len(cache.store) == 4 and cache.bytes == 80 and cache.refused == 1
    assert torch.equal(targets, logits.half().float())  # the row left out gets the same round trip
    assert cache.lookup(cache.keys(x)) is None  # one row missing: the teacher runs for the batch
    assert torch.equal(cache.lookup(cache.keys(x[:4])), targets[:4])


@pytest.mark.parametrize("storage", [dict(dtype=torch.float16), dict(dtype=torch.bfloat16, top_k=3)])
def test_fresh_targets_equal_cached_ones(storage):
    cache = TeacherCache(temperature=2.0, **storage)
    x, logits = torch.randn(6, 4), 10 * torch.randn(6, 2, 7, dtype=torch.float64)  # sequences, in float64
    fresh = cache.add(cache.keys(x), logits)
    assert fresh.dtype == torch.float32 and not torch.equal(fresh, logits.float())  # the storage rounds
    assert torch.equal(fresh, cache.lookup(cache.keys(x))) and torch.equal(fresh, cache.round_trip(logits))


def epoch(cache, batches, batches_in_epoch):
    for x in batches:
        if cache.lookup(keys := cache.keys(x)) is None:
            cache.add(keys, torch.zeros(len(x), 3))
    return cache.end_epoch(batches_in_epoch)


def test_augmentation_check_needs_a_complete_pass_first():
    data = list(torch.randn(4, 8, 5))  # 4 batches of 8
    cache = TeacherCache()
    assert epoch(cache, data[:3], 4) is None and cache.passes == 0  # incomplete (a mid-epoch resume)
    assert epoch(cache, data, None) is None and cache.passes == 0  # unknown length (limited or sharded epochs)
    assert epoch(cache, [torch.randn(8, 5) for _ in range(4)], 4) is None and cache.passes == 1  # not checked yet
    assert cache.enabled and len(cache.store) == 64
    assert epoch(cache, data, 4) is None and cache.passes == 2  # every input seen before
    message = epoch(cache, [torch.randn(8, 5) for _ in range(4)], 4)  # new inputs on a repeated pass
    assert message.startswith("Teacher cache: only 0% of this epoch's inputs were seen before")
    assert not cache.enabled and not cache.store and cache.bytes == 0 and cache.passes == 0


def test_a_full_cache_is_no_evidence_of_augmentation():
    data = list(torch.randn(4, 8, 5))
    cache = TeacherCache(max_bytes=10 * 3 * 4)  # room for 10 rows of 3 float32 logits
    assert epoch(cache, data, 4) == ("Teacher cache: full with 10 rows (120 bytes, `max_bytes` is 120); the "
                                     "teacher runs for the inputs left out. A larger bound caches more.")
    assert cache.full and cache.passes == 1
    assert epoch(cache, data, 4) is None and epoch(cache, list(torch.randn(4, 8, 5)), 4) is None  # said once
    assert cache.enabled and len(cache.store) == 10
    # filling up during the repeated pass itself: everything seen before was stored, so misses are new inputs
    roomy = TeacherCache(max_bytes=48 * 3 * 4)
    assert epoch(roomy, data, 4) is None and not roomy.full
    assert "random augmentation" in epoch(roomy, list(torch.randn(4, 8, 5)), 4) and not roomy.enabled


def test_state_without_contents_restores_an_empty_cache():
    data = list(torch.randn(4, 8, 5))
    cache = TeacherCache(top_k=2)
    epoch(cache, data, 4)
    for x in data[:2]:
        cache.lookup(cache.keys(x))  # half of the second epoch
    small = cache.state_dict(contents=False)
    assert small == dict(enabled=True, top_k=2, classes=3, passes=1, full=False, hits=16, lookups=16, batches=2,
                         refused=0)
    state = cache.state_dict()
    assert set(state) == set(small) | {"keys", "values"} and state["keys"].shape == (32, 16)
    restored = TeacherCache(top_k=2)
    restored.load_state_dict(state)
    assert restored.state_dict(contents=False) == small and restored.bytes == cache.bytes
    emptied = TeacherCache(top_k=2)
    emptied.load_state_dict(small)  # the counters described contents that are gone: count afresh
    assert (emptied.passes, emptied.batches, emptied.hits, len(emptied.store)) == (0, 0, 0, 0)
    assert emptied.classes == 3 and emptied.enabled
    for x in data[2:]:
        emptied.lookup(emptied.keys(x))
    assert emptied.end_epoch(4) is None and emptied.passes == 0  # the rest of an epoch is no complete pass


def test_topk_misconfiguration():
    teacher, student = MLP(16, 32), MLP(16, 8)
    with pytest.raises(ValueError, match=r"`cache` to be a TeacherCache with top_k=None with task_loss='mse'"):
        DistillationModule(student, teacher, cache=TeacherCache(top_k=4), task_loss="mse")
    with pytest.raises(TypeError, match=r"`dtype` to be a floating-point torch.dtype"):
        TeacherCache(dtype=torch.int8)
    # the cache names its own arguments
    with pytest.raises(ValueError, match=r"Expected argument `max_bytes` to be an int >= 1, but got 0"):
        TeacherCache(max_bytes=0)
    with pytest.raises(ValueError, match=r"Expected argument `top_k` to be an int >= 1"):
        TeacherCache(top_k=0)
    with pytest.raises(TypeError, match=r"Expected argument `dtype` to be a floating-point torch.dtype"):
        TeacherCache(dtype=torch.int8)
    assert TeacherCache(dtype="bfloat16").dtype == torch.bfloat16
    assert math.isfinite(float(topk_compress(torch.zeros(1, 3), 1)[2]))
    with pytest.raises(ValueError, match=r"`k` to be an int >= 1"):
        topk_compress(torch.zeros(1, 3), 0)  # ties and equal logits are fine


# ---------------------------------------------------------------------------------------------- in a fit
def teacher_and_student():
    torch.manual_seed(0)
    return MLP(16, 64), MLP(16, 8)


def cache_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("Teacher cache")]


@pytest.mark.parametrize("in_checkpoint", [False, True])
def test_cache_contents_in_checkpoints_only_when_asked(tmp_path, in_checkpoint):
    teacher, student = teacher_and_student()
    module = DistillationModule(student, teacher, cache=TeacherCache(in_checkpoint=in_checkpoint))
    fit(tmp_path, [ModelCheckpoint(dirpath=tmp_path, filename="first")], module=module, max_epochs=1,
        enable_checkpointing=True)
    state = torch.load(tmp_path / "first.ckpt", weights_only=False)["litcompress_teacher_cache"]
    small = {"enabled", "top_k", "classes", "passes", "full", "hits", "lookups", "batches", "refused"}
    assert set(state) == (small | {"keys", "values"} if in_checkpoint else small)
    assert state["enabled"] and state["passes"] == 1 and state["batches"] == 0  # saved after the epoch closed
    if in_checkpoint:
        assert state["keys"].shape == (64, 16) and state["values"][0].shape == (64, 4)
    # resumed: the teacher runs again in the second epoch only when the contents were left out
    teacher, student = teacher_and_student()
    calls = TeacherCalls(teacher)
    resumed = DistillationModule(student, teacher, cache=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [calls], module=resumed, max_epochs=3, ckpt_path=tmp_path / "first.ckpt")
    assert calls.per_epoch.get(1, 0) == (0 if in_checkpoint else 4) and calls.per_epoch.get(2, 0) == 0
    assert not cache_warnings(caught) and resumed.teacher_cache.enabled


def test_limited_shuffled_epochs_do_not_look_like_augmentation(tmp_path):
    teacher, student = teacher_and_student()
    module = DistillationModule(student, teacher, cache=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, limit_train_batches=0.25))
    data = DataLoader(classification_data((16,), n=64), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))  # one random quarter of the data per epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    assert not cache_warnings(caught) and module.teacher_cache.enabled
    assert module.teacher_cache.passes == 0  # a quarter of the data is no complete pass


def test_a_full_cache_does_not_blame_augmentation(tmp_path):
    teacher, student = teacher_and_student()
    calls = TeacherCalls(teacher)
    module = DistillationModule(student, teacher, cache=TeacherCache(max_bytes=20 * 4 * 4))  # room for 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [calls], module=module, max_epochs=3)
    assert cache_warnings(caught) == ["Teacher cache: full with 20 rows (320 bytes, `max_bytes` is 320); the "
                                      "teacher runs for the inputs left out. A larger bound caches more."]
    assert module.teacher_cache.enabled and len(module.teacher_cache.store) == 20
    assert calls.per_epoch[1] == calls.per_epoch[2] == 3  # the first batch is cached, the other three are not


def test_keys_of_dict_inputs_cover_every_tensor_the_teacher_sees():
    ids, mask = torch.arange(12).reshape(4, 3), torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    inputs, _ = split_batch(batch)
    keys = TeacherCache.keys(inputs)
    assert len(set(keys)) == 4 and TeacherCache.keys({k: v.clone() for k, v in inputs.items()}) == keys
    assert TeacherCache.keys(split_batch(dict(batch, labels=ids + 1))[0]) == keys  # labels: not the teacher's
    unpadded = dict(inputs, attention_mask=torch.ones_like(mask))
    assert [a != b for a, b in zip(TeacherCache.keys(unpadded), keys)] == [True, False, True, False]
    assert TeacherCache.keys(ids) != keys and TeacherCache.keys(dict(inputs, flag=True)) != keys
    x = torch.arange(6.0).reshape(2, 3)
    first = hashlib.blake2b(b"(3,)torch.float32" + x[0].numpy().tobytes(), digest_size=16).digest()
    assert TeacherCache.keys(x)[0] == first  # a tensor's keys are as before: saved cache contents stay valid
    with pytest.raises(ValueError, match="`inputs` to be a tensor, or a dict whose tensors share the batch"):
        TeacherCache.keys(dict(inputs, bias=torch.zeros(3)))
    with pytest.raises(ValueError, match="tensors and plain values"):
        TeacherCache.keys(dict(inputs, past=[torch.zeros(4)]))


def test_one_teacher_cache_configures_modules_that_each_hold_their_own():
    teacher, student = MLP(16, 32), MLP(16, 8)
    settings = TeacherCache(max_bytes=4096, dtype="float16", top_k=2, in_checkpoint=True)
    a = DistillationModule(student, teacher, temperature=3.0, cache=settings)
    b = DistillationModule(MLP(16, 8), teacher, temperature=3.0, cache=settings)
    assert a.teacher_cache is not b.teacher_cache and a.teacher_cache is not settings
    for cache in (a.teacher_cache, b.teacher_cache):
        assert (cache.max_bytes, cache.dtype, cache.top_k, cache.in_checkpoint) == (4096, torch.float16, 2, True)
        assert cache.temperature == 3.0  # None: the distillation temperature, which the top-k fill is exact at
    assert settings.temperature is None and not settings.store  # the settings object is left as it was
    keys = a.teacher_cache.keys(torch.zeros(1, 16))
    a.teacher_cache.add(keys, torch.zeros(1, 4))
    assert b.teacher_cache.lookup(keys) is None
