"""`TeacherCache` and its top-k storage: exact kept probabilities, memory, and a real fit on a language model."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from litcompress import DistillationModule
from litcompress.distillation import TeacherCache, topk_compress, topk_expand
from tests.helpers import TeacherCalls
from tests.models import MLP, TinyGPT, lm_data, trainer_kwargs


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
    module = DistillationModule(student, teacher, cache_teacher=True, **options)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs), callbacks=[calls])
    trainer.fit(module, DataLoader(lm_data(n=64), batch_size=16))
    return module, teacher, calls.per_epoch


def test_topk_cache_in_a_fit_on_token_logits(tmp_path):
    k = 4
    module, teacher, calls = fit_gpt(tmp_path, cache_top_k=k, cache_dtype=torch.float16)
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
    topk, _, _ = fit_gpt(tmp_path, epochs=3, cache_top_k=32)  # vocab 32: nothing dropped, float32: exact
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
    with pytest.raises(ValueError, match=r"`cache_top_k` to be 2, as in the checkpoint"):
        TeacherCache(top_k=None).load_state_dict(cache.state_dict())


def test_memory_bound_leaves_the_rest_to_the_teacher():
    cache = TeacherCache(max_bytes=2 * 10 * 4)  # room for two rows of 10 float32 logits
    x = torch.randn(3, 4)
    cache.add(cache.keys(x), torch.randn(3, 10))
    assert len(cache.store) == 2 and cache.bytes == 80
    assert cache.lookup(cache.keys(x)) is None  # one row missing: the teacher runs for the batch


def test_topk_misconfiguration():
    teacher, student = MLP(16, 32), MLP(16, 8)
    with pytest.raises(ValueError, match=r"`cache_top_k` to be None unless `cache_teacher=True`"):
        DistillationModule(student, teacher, cache_top_k=4)
    with pytest.raises(ValueError, match=r"`cache_top_k` to be None with task_loss='mse'"):
        DistillationModule(student, teacher, cache_teacher=True, cache_top_k=4, task_loss="mse")
    with pytest.raises(ValueError, match=r"`cache_top_k` to be an int >= 1"):
        DistillationModule(student, teacher, cache_teacher=True, cache_top_k=0)
    with pytest.raises(TypeError, match=r"`cache_dtype` to be a floating-point torch.dtype"):
        DistillationModule(student, teacher, cache_teacher=True, cache_dtype=torch.int8)
    assert math.isfinite(float(topk_compress(torch.zeros(1, 3), 1)[2]))
    with pytest.raises(ValueError, match=r"`k` to be an int >= 1"):
        topk_compress(torch.zeros(1, 3), 0)  # ties and equal logits are fine
