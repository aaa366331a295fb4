import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from litcompress.sparsity.masks import check_nm, global_masks, nm_mask, parse_nm, unstructured_mask


def reference_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Independent reference: stable sort, prune the first round(s * n)."""
    flat = scores.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[: round(sparsity * flat.numel())]] = False
    return keep.reshape(scores.shape)


shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
fractions = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, s=fractions, seed=st.integers(0, 10_000), ties=st.booleans())
def test_unstructured_matches_reference_exactly(shape, s, seed, ties):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if ties:
        scores = scores.round()  # many equal scores: ties must go to the lower index
    mask = unstructured_mask(scores, s)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, reference_mask(scores, s))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, s1=fractions, s2=fractions, seed=st.integers(0, 10_000))
def test_masks_are_monotone(shape, s1, s2, seed):
    g = torch.Generator().manual_seed(seed)
    first = unstructured_mask(torch.randn(shape, generator=g), s1)
    second = unstructured_mask(torch.randn(shape, generator=g), s2, mask=first)
    assert not (second & ~first).any()  # nothing pruned comes back
    n = first.numel()
    assert int((~second).sum()) == max(round(s2 * n), int((~first).sum()))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), s=fractions, seed=st.integers(0, 1000))
def test_global_masks_exact_total_and_one_threshold(sizes, s, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randn(n, generator=g) for n in sizes]
    masks = global_masks(scores, s)
    total = sum(sizes)
    assert sum(int((~m).sum()) for m in masks) == round(s * total)
    kept = torch.cat([x[m] for x, m in zip(scores, masks)])
    pruned = torch.cat([x[~m] for x, m in zip(scores, masks)])
    if kept.numel() and pruned.numel():
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("dim", [0, 1])
def test_nm_pattern_exact(n, m, dim):
    shape = (16, 16, 3)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m, dim=dim)
    assert check_nm(mask.float(), n, m, dim=dim)
    assert int((~mask).sum()) == mask.numel() * (m - n) // m
    # each group keeps exactly its n best entries
    groups = scores.movedim(dim, -1).reshape(-1, m)
    kept = mask.movedim(dim, -1).reshape(-1, m)
    best = groups.topk(n, dim=1).indices
    assert torch.equal(kept.gather(1, best), torch.ones_like(best, dtype=torch.bool))


def test_nm_gradual_never_exceeds_group_budget_and_ends_exact():
    scores = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    mask = None
    for fraction in (0.0, 0.3, 0.6, 0.9, 1.0):
        mask = nm_mask(scores, 2, 4, fraction, mask)
        per_group = (~mask).reshape(-1, 4).sum(1)
        assert int(per_group.max()) <= 2
        assert int((~mask).sum()) == round(fraction * 0.5 * mask.numel())
    assert check_nm(mask.float(), 2, 4)


def test_check_nm_and_parse():
    assert check_nm(torch.tensor([[1.0, 0.0, 0.0, 3.0]]), 2, 4)
    assert not check_nm(torch.tensor([[1.0, 2.0, 0.0, 3.0]]), 2, 4)
    assert not check_nm(torch.ones(2, 6), 2, 4)  # 6 inputs cannot hold groups of 4
    assert parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ("2:2", "0:4", "a:b", "2-4", 24):
        with pytest.raises(ValueError, match="Expected argument `pattern`"):
            parse_nm(bad)


def test_mask_errors():
    with pytest.raises(ValueError, match="finite importance scores"):
        unstructured_mask(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match=r"Expected argument `sparsity` to be a float in the \[0, 1\] range"):
        unstructured_mask(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="M dividing the input size"):
        nm_mask(torch.ones(4, 6), 2, 4)


def _reference_global_masks(scores, sparsity, masks):
    """The definition: one sort of all scores (pruned entries first), ties to the lower position."""
    flats = [s.float().reshape(-1) if m is None else s.float().reshape(-1).masked_fill(~m.reshape(-1), -torch.inf)
             for s, m in zip(scores, masks)]
    cat = torch.cat(flats)
    already = sum(0 if m is None else int((~m).sum()) for m in masks)
    k = max(round(sparsity * cat.numel()), already)
    order = torch.sort(cat, stable=True).indices[:k]
    pruned = torch.zeros_like(cat, dtype=torch.bool)
    pruned[order] = True
    return [~p.reshape(s.shape) for p, s in zip(pruned.split([s.numel() for s in scores]), scores)]


@pytest.mark.parametrize("seed", range(12))
def test_streamed_global_threshold_equals_one_sort_of_all_scores(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 2), (1, 1)]
    kinds = seed % 3  # continuous, heavy ties, negative values (movement scores)
    scores = []
    for shape in shapes:
        x = torch.randn(shape, generator=g)
        if kinds == 1:
            x = torch.randint(0, 3, shape, generator=g).float()
        scores.append(x if kinds == 2 else x.abs())
    masks = [None] * len(shapes)
    for sparsity in (0.0, 0.2, 0.5, 0.5, 0.9, 1.0):
        got = global_masks(scores, sparsity, masks)
        want = _reference_global_masks(scores, sparsity, masks)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), sparsity
        masks = got if sparsity < 1.0 else masks


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 1.0])
def test_global_masks_from_callables_equal_masks_from_tensors(sparsity):
    """Scores given as functions (computed one tensor at a time, as the magnitude pruner does) give the same masks,
    ties and earlier masks included; every function is called again for each pass it is needed in."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-4, 5, (6, 5), generator=g).float(), torch.randn(7, generator=g), torch.zeros(3, 2)]
    earlier = [torch.rand(6, 5, generator=g) > 0.3, None, None]
    calls = []

    def lazy(w):
        def scores():
            calls.append(1)
            return w.abs()
        return scores

    want = global_masks([w.abs() for w in weights], sparsity, earlier)
    got = global_masks([lazy(w) for w in weights], sparsity, earlier)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(a.shape == w.shape for a, w in zip(got, weights))
    if 0 < sparsity < 1:
        assert len(calls) > 2 * len(weights)
