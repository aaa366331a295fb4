"""Random small architectures through every compression technique and every pair of them (issue 22, item 11): the
fit either refuses before its first step with a named reason, or the final model runs on fresh inputs, equals the
masked or factorized model, holds the sparsity reported, and survives save/load and ONNX export.

The builder and the oracle are in ``tests/property/structures.py`` (its docstring lists every check);
``benchmarks/bench_property.py`` runs the same oracle on thousands of cases. Here: each technique and each pair
(both orders drawn), ``EXAMPLES`` cases each from a fixed hypothesis seed per set (the first is hypothesis's simplest:
one Linear block), without shrinking (each try is a fit; a failure prints its case, which ``run_case`` reruns).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.property.structures import (
    KNOWN,
    PAIRS,
    SINGLES,
    Block,
    Case,
    draw_case,
    known_issue,
    run_case,
)

pytest.importorskip("torch_pruning")

EXAMPLES = 4
SETS = SINGLES + PAIRS  # each technique, and each pair of two (its order is drawn)


def cases(techniques: tuple[str, ...]) -> st.SearchStrategy[Case]:
    orders = [techniques] if len(techniques) == 1 else [techniques, techniques[::-1]]

    @st.composite
    def strategy(draw: st.DrawFn) -> Case:
        return draw_case(lambda options: draw(st.sampled_from(list(options))), orders)

    return strategy()


def judge(case: Case) -> str:
    result = run_case(case)
    failed = result.outcome in ("wrong", "crash") and known_issue(case, result) is None
    assert not failed, f"{result.outcome}: {result.reason}\n{case!r}"
    return result.outcome


@pytest.mark.parametrize("techniques", SETS, ids=["+".join(t) for t in SETS])
def test_refused_before_the_first_step_or_right(techniques):
    seen: list[str] = []

    @seed(SETS.index(techniques))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.generate])  # no shrinking: each step is a fit; the case is printed
    @given(case=cases(techniques))
    def check(case: Case) -> None:
        seen.append(judge(case))

    check()
    assert len(seen) >= EXAMPLES


class StillFails(AssertionError):
    """A known issue's example fails as recorded."""


@pytest.mark.parametrize("issue", [pytest.param(k, id=k.name, marks=pytest.mark.xfail(
    strict=True, raises=StillFails, reason=f"known issue: {k.description}")) for k in KNOWN])
def test_known_issue(issue):
    """Each known issue's example, held to the oracle. It fails as recorded (xfail); fixed, it passes and the strict
    xfail fails: then remove the entry from ``KNOWN``, and the property test holds those cases to the oracle again.
    A failure of another kind is a plain failure."""
    result = run_case(issue.example)
    if result.outcome in ("wrong", "crash"):
        if known_issue(issue.example, result) is issue:
            raise StillFails(f"{result.outcome}: {result.reason}")
        raise AssertionError(f"fails otherwise than recorded: {result.outcome}: {result.reason}")


# ---------------------------------------------------------------------------------------------- the oracle can fail
def test_a_removal_that_changes_the_outputs_is_a_wrong_result(monkeypatch):
    """The oracle itself: a removal that also moves one bias (after the checks on a copy passed) is caught."""
    import torch

    from litcompress.callbacks import _channels

    remove = _channels._remove

    def off_by_a_little(callback, pruner):
        done = remove(callback, pruner)
        with torch.no_grad():
            pruner.model.net.head.bias.add_(1e-2)
        return done

    monkeypatch.setattr(_channels, "_remove", off_by_a_little)
    result = run_case(Case(blocks=(Block("linear", 16),), techniques=("channels",)))
    assert result.outcome == "wrong" and "just after the removal at end" in result.reason, result


def test_an_unnamed_error_before_the_first_step_is_a_crash(monkeypatch):
    from litcompress.sparsity import channels

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(channels, "coupled_groups", broken)
    result = run_case(Case(blocks=(Block("linear", 16),), techniques=("channels",)))
    assert result.outcome == "crash" and "before step 0, not a named refusal: IndexError" in result.reason, result


def test_a_refusal_is_named_and_leaves_the_model_as_it_was():
    """Two pruners selecting the same tensors (Pruning placed first): refused before the first step, the model
    untouched; the oracle tallies it by its reason."""
    result = run_case(Case(blocks=(Block("linear", 16),), techniques=("unstructured", "channels"), split=False))
    assert result.outcome == "refused", result
    assert result.reason == "ValueError: parameters: disjoint selections for ChannelPruning and Pruning"


def test_a_misreported_sparsity_is_a_wrong_result(monkeypatch):
    from litcompress.sparsity.pruner import Pruner

    monkeypatch.setattr(Pruner, "global_sparsity", lambda self: 0.6)  # 0.5 of the weights are zero
    result = run_case(Case(blocks=(Block("linear", 16),), techniques=("unstructured",)))
    assert result.outcome == "wrong" and "global_sparsity() = 0.6000, but 0.5" in result.reason, result
