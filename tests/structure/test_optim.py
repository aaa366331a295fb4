"""Optimizers edited in place follow replaced parameters: the kept slices' state carries over exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from litcompress.structure import keep_slices, replace_parameters


def _stepped(optimizer_cls, **kwargs):
    torch.manual_seed(0)
    old = nn.Parameter(torch.randn(6, 4))
    other = nn.Parameter(torch.randn(3))
    opt = optimizer_cls([old, other], **kwargs)
    for _ in range(3):
        opt.zero_grad()
        ((old ** 2).sum() + other.sum()).backward()
        opt.step()
    return old, other, opt


@pytest.mark.parametrize(("cls", "kwargs"), [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
])
def test_sliced_state_equals_the_kept_slices_of_the_old_state(cls, kwargs):
    old, other, opt = _stepped(cls, **kwargs)
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([1, 3])
    new = nn.Parameter(old.detach()[rows][:, cols].clone())
    before = {k: v.clone() for k, v in opt.state[old].items()}
    other_state = {k: v.clone() for k, v in opt.state[other].items()}
    assert replace_parameters([opt], {old: [(new, keep_slices({0: rows, 1: cols}))]}) == 1
    assert opt.param_groups[0]["params"] == [new, other] and old not in opt.state
    for key, value in before.items():
        expected = value[rows][:, cols] if value.dim() else value
        assert torch.equal(opt.state[new][key], expected)
    assert all(torch.equal(opt.state[other][k], v) for k, v in other_state.items())
    new.grad = torch.ones_like(new)
    other.grad = torch.ones_like(other)
    opt.step()  # the optimizer steps the new parameter with its carried state


def test_successors_without_carry_start_fresh_at_the_old_position():
    old, other, opt = _stepped(torch.optim.Adam, lr=0.01)
    a, b = nn.Parameter(torch.zeros(6, 2)), nn.Parameter(torch.zeros(2, 4))
    replace_parameters([opt], {old: [(a, None), (b, None)]})
    assert opt.param_groups[0]["params"] == [a, b, other]
    assert a not in opt.state and b not in opt.state and other in opt.state


def test_factored_state_is_not_sliced():
    old = nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.SGD([old], lr=0.1)
    opt.state[old] = {"row": torch.ones(4), "step": torch.tensor(3.0)}  # a factored statistic (Adafactor-like)
    new = nn.Parameter(torch.randn(2, 4))
    replace_parameters([opt], {old: [(new, keep_slices({0: torch.tensor([0, 1])}))]})
    assert new not in opt.state


def test_parameters_no_optimizer_holds_are_not_found():
    _, _, opt = _stepped(torch.optim.SGD, lr=0.1)
    stranger = nn.Parameter(torch.zeros(2))
    assert replace_parameters([opt], {stranger: [(nn.Parameter(torch.zeros(1)), None)]}) == 0
