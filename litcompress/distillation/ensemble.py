"""`TeacherEnsemble`: several teachers as one, with their softened predictions averaged.

>>> import torch
>>> from torch import nn
>>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)
>>> ensemble = TeacherEnsemble([a, b], temperature=4.0)
>>> x = torch.randn(2, 4)
>>> p = ((a(x) / 4).softmax(-1) + (b(x) / 4).softmax(-1)) / 2
>>> torch.allclose((ensemble(x) / 4).softmax(-1), p)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litcompress._validation import check_choice, fail, fail_state
from litcompress.distillation.batches import output_logits

__all__ = ["TeacherEnsemble"]


class TeacherEnsemble(nn.Module):
    """Average teachers: their softened class probabilities (the output is ``T * log(mean_i softmax(t_i / T))``,
    logits whose softmax at temperature ``T`` is exactly the averaged distribution) or, for regression, their
    outputs.

    Args:
        teachers: two or more models with outputs of the same shape.
        temperature: the distillation temperature the probabilities are averaged at.
        average: ``"probabilities"`` (classification, sequences) or ``"outputs"`` (regression).
    """

    def __init__(self, teachers: Sequence[nn.Module], temperature: float = 4.0,
                 average: Literal["probabilities", "outputs"] = "probabilities") -> None:
        super().__init__()
        if not isinstance(teachers, (list, tuple)) or len(teachers) < 2 or not all(
                isinstance(t, nn.Module) for t in teachers):
            fail("teachers", "a list of two or more modules", teachers, exc=TypeError)
        check_choice("average", average, ("probabilities", "outputs"))
        self.members = nn.ModuleList(teachers)
        self.temperature, self.average = float(temperature), average

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        outputs = [output_logits(m(*args, **kwargs)) for m in self.members]  # tensors or ModelOutputs' logits
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) > 1:
            fail_state(f"ensemble members returned outputs of different shapes {sorted(shapes)}", "TeacherEnsemble",
                       "give teachers whose outputs have one shape", exc=ValueError)
        if self.average == "outputs":
            return torch.stack(outputs).mean(0)
        t = self.temperature
        probs = torch.stack([F.softmax(o.float() / t, dim=-1) for o in outputs]).mean(0)
        return t * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
