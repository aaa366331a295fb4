"""The arguments of :class:`~litcompress.DistillationModule`, checked in pure torch (messages name them as it does).

>>> from torch import nn
>>> type(check_models(nn.Linear(2, 2), [nn.Linear(2, 2), nn.Linear(2, 2)], temperature=2.0)).__name__
'TeacherEnsemble'
>>> check_options(temperature=0.0)
Traceback (most recent call last):
    ...
ValueError: Expected argument `temperature` to be a float > 0, but got 0.0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from litcompress._validation import check_fraction, check_int, check_real, fail
from litcompress.distillation.ensemble import TeacherEnsemble

__all__ = ["check_dtypes", "check_models", "check_options"]


def check_models(student: Any, teacher: Any, temperature: Any = 1.0, task_loss: Any = "cross_entropy"
                 ) -> nn.Module | None:
    """Check the student and the teacher (a model, a list of two or more, or ``None``); returns the teacher, a
    :class:`TeacherEnsemble` for a list (averaging outputs for ``task_loss="mse"``, probabilities otherwise).

    Args:
        student: the model to train, an ``nn.Module``.
        teacher: a module other than the student (with weights, not on the meta device), a list of two or more,
            or ``None``.
        temperature: the distillation temperature an ensemble averages its softened probabilities at.
        task_loss: the task loss; ``"mse"`` makes an ensemble average raw outputs.
    """
    if not isinstance(student, nn.Module):
        fail("student", "a torch.nn.Module", type(student).__name__, exc=TypeError)
    if isinstance(teacher, (list, tuple)):
        if len(teacher) < 2 or not all(isinstance(t, nn.Module) for t in teacher):
            fail("teacher", "a module or a list of two or more modules", teacher, exc=TypeError)
        if any(t is student for t in teacher):
            fail("teacher", "models other than the student", "a list holding the student")
        teacher = TeacherEnsemble(teacher, temperature if isinstance(temperature, (int, float)) else 1.0,
                                  "outputs" if task_loss == "mse" else "probabilities")
    if teacher is not None and not isinstance(teacher, nn.Module):
        fail("teacher", "a torch.nn.Module, a list of them, or None", type(teacher).__name__, exc=TypeError)
    if teacher is student:
        fail("teacher", "a model other than the student", "the student itself")
    if teacher is not None and any(p.is_meta for p in teacher.parameters()):
        fail("teacher", "a model with weights (not on the meta device)", type(teacher).__name__,
              hint="load the teacher's weights before passing it, e.g. `teacher.to_empty(device='cpu')` then "
                   "`teacher.load_state_dict(...)`")
    return teacher


def check_dtypes(student: nn.Module, teacher: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
    """The teacher computes in the dtype the student trains in. Under mixed precision, where autocast casts, do not
    call this.

    Args:
        student: the student.
        teacher: the teacher; its first floating-point parameter's dtype is compared.
        compute_dtype: the dtype the training precision computes in (``torch.bfloat16`` for ``bf16-true``);
            ``None``: the student's own parameter dtype.
    """
    def dtype(model: nn.Module) -> Any:
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)

    s, t = compute_dtype or dtype(student), dtype(teacher)
    if s is not None and t is not None and s != t:
        fail("teacher", f"a model in the dtype the student trains in ({s})", f"a {t} model",
             hint=f"convert it with `teacher.to({s})` or train with a mixed precision (e.g. 'bf16-mixed')")


def check_options(*, temperature: Any = 4.0, alpha: Any = 0.9, task_loss: Any = "cross_entropy",
                  ignore_index: Any = -100, lr: Any = 1e-3, weight_decay: Any = 0.0, num_classes: Any = None,
                  shift_labels: Any = None) -> None:
    """Check the scalar arguments of :class:`~litcompress.DistillationModule` (its option groups check themselves).

    Args:
        temperature: the softmax temperature, a finite float > 0.
        alpha: weight of the distillation term, in [0, 1]; 1.0 when ``task_loss`` is None.
        task_loss: ``"cross_entropy"``, ``"mse"``, a callable or None.
        ignore_index: an int (the padding label).
        lr: the learning rate, a finite float > 0.
        weight_decay: a finite float >= 0.
        num_classes: an int >= 2 or None.
        shift_labels: a bool or None.
    """
    check_real("temperature", temperature)
    check_fraction("alpha", alpha, closed_right=True)
    if task_loss is None and alpha < 1:
        fail("alpha", "1.0 when `task_loss` is None (label-free distillation has no task term)", alpha)
    if task_loss is not None and not callable(task_loss) and task_loss not in ("cross_entropy", "mse"):
        fail("task_loss", "'cross_entropy', 'mse', a callable fn(output, target) or None", task_loss)
    check_real("lr", lr)
    check_real("weight_decay", weight_decay, strict=False)
    check_int("ignore_index", ignore_index)
    check_int("num_classes", num_classes, minimum=2, allow_none=True)
    if shift_labels is not None and not isinstance(shift_labels, bool):
        fail("shift_labels", "a bool or None", shift_labels, exc=TypeError)
