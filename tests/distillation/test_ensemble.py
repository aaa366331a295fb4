"""`TeacherEnsemble` on its own: the averaged distribution, and errors that name its own arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litcompress.distillation import TeacherEnsemble
from litcompress.quantization.functional import signed_range, unsigned_range


def test_ensemble_logits_give_the_averaged_distribution():
    torch.manual_seed(0)
    t1, t2, x = nn.Linear(4, 3), nn.Linear(4, 3), torch.randn(5, 4)
    out = TeacherEnsemble([t1, t2], temperature=2.0)(x)
    expected = (F.softmax(t1(x) / 2, -1) + F.softmax(t2(x) / 2, -1)) / 2
    torch.testing.assert_close(F.softmax(out / 2, -1), expected)


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: TeacherEnsemble([nn.Linear(2, 2)]), TypeError, "`teachers` to be a list of two or more modules"),
    (lambda: TeacherEnsemble([nn.Linear(2, 2)] * 2, average="median"), ValueError, "`average`"),
    (lambda: signed_range(9), ValueError, r"`bits` to be an int in \[2, 8\]"),
    (lambda: unsigned_range(1), ValueError, r"`bits` to be an int in \[2, 8\]"),
])
def test_errors_name_the_functions_own_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
