import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from litcompress import schedules
from litcompress.schedules import SCHEDULES, get_schedule, latest_update, progress

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_endpoints(name):
    fn = SCHEDULES[name]
    assert fn(1.0) == 1.0
    assert 0.0 <= fn(0.0) <= 1.0


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@given(a=unit, b=unit)
def test_schedule_monotone_and_bounded(name, a, b):
    fn = SCHEDULES[name]
    lo, hi = min(a, b), max(a, b)
    assert 0.0 <= fn(lo) <= fn(hi) <= 1.0


@given(p=unit)
def test_cubic_matches_zhu_gupta(p):
    # s_t = s_f + (s_i - s_f)(1 - p)^3 with s_i = 0, s_f = 0.9, as a fraction of s_f
    s_f = 0.9
    assert math.isclose(s_f * schedules.cubic(p), s_f + (0 - s_f) * (1 - p) ** 3, abs_tol=1e-12)


def test_gradual_schedules_start_at_zero_and_one_shot_at_one():
    assert schedules.linear(0.0) == schedules.cubic(0.0) == schedules.exponential(0.0) == 0.0
    assert schedules.one_shot(0.0) == 1.0


@given(step=st.integers(-5, 500), start=st.integers(0, 100), length=st.integers(1, 300))
def test_progress_clamped_and_linear(step, start, length):
    end = start + length
    p = progress(step, start, end)
    assert 0.0 <= p <= 1.0
    if start <= step <= end:
        assert math.isclose(p, (step - start) / length)


@given(start=st.integers(0, 50), length=st.integers(1, 100), frequency=st.integers(1, 30))
def test_update_steps_cover_start_and_end_at_frequency(start, length, frequency):
    end = start + length
    latest = [latest_update(s, start, end, frequency) for s in range(end + 10)]
    assert all(p is None for p in latest[:start]) and all(p == end for p in latest[end:])
    assert all(p is None or p <= s for s, p in enumerate(latest))
    points = sorted({p for p in latest if p is not None})
    assert points[0] == start and points[-1] == end
    inner = points[:-1] if (end - start) % frequency else points
    assert all(b - a == frequency for a, b in itertools.pairwise(inner))


def test_exponential_rate_must_be_positive():
    with pytest.raises(ValueError, match="`rate`"):
        schedules.exponential(0.5, rate=0)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda p: 2 * p, r"values in \[0, 1\]"),
        (lambda p: 1 - p, "non-decreasing"),
        (lambda p: 0.5 * p, "exactly 1.0 at progress 1.0"),
    ],
)
def test_bad_callable_schedules(fn, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(fn)


def test_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="Expected argument `schedule` to be one of"):
        get_schedule("cosine")
    with pytest.raises(TypeError, match="`schedule`"):
        get_schedule(3)
    with pytest.raises(TypeError, match=r"Expected argument `schedule` to be a callable taking a float progress"):
        get_schedule(lambda p: p["x"])
    assert get_schedule(lambda p: p**2)(0.5) == 0.25
