"""Distillation losses in pure torch.

>>> import torch
>>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
>>> float(kd_loss(s, t, temperature=4.0))
0.0
>>> round(float(kd_loss(torch.tensor([[0.0, 2.0]]), t, temperature=1.0)), 4)  # KL(p_t || p_s)
1.5232
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from litcompress._validation import check_real, fail

__all__ = ["kd_loss", "mse_distillation_loss"]


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0, mask: Tensor | None = None) -> Tensor:
    """Hinton et al.'s soft-target loss: ``KL(softmax(t / T) || softmax(s / T)) * T^2``, averaged over positions.

    Args:
        student: logits ``(B, C)`` or ``(B, T, V)``.
        teacher: logits of the same shape.
        temperature: ``T > 0``; the ``T^2`` factor keeps gradient sizes comparable when mixed with a hard loss.
        mask: optional bool ``(B,)`` or ``(B, T)``: positions that count (padding excluded).
    """
    check_real("temperature", temperature)
    if student.shape != teacher.shape:
        fail("teacher", f"outputs shaped like the student's {tuple(student.shape)}", tuple(teacher.shape),
              hint="teacher and student must predict over the same classes / vocabulary")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # (B,) or (B, T)
    if mask is not None:
        per_position = per_position[mask]
    if per_position.numel() == 0:
        return student.sum() * 0.0
    return per_position.mean() * temperature**2


def mse_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between student and teacher outputs (regression distillation).

    >>> import torch
    >>> float(mse_distillation_loss(torch.ones(2, 3), torch.zeros(2, 3)))
    1.0
    """
    if student.shape != teacher.shape:
        fail("teacher", f"outputs shaped like the student's {tuple(student.shape)}", tuple(teacher.shape))
    return F.mse_loss(student.float(), teacher.float())
