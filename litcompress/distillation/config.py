"""The options of :class:`~litcompress.DistillationModule` that come in groups, as small frozen dataclasses that
check themselves (the torchao ``QATConfig`` habit): feature distillation and the mixup transfer set. The teacher
cache has its own class, :class:`~litcompress.distillation.TeacherCache`.

>>> FeatureDistillation({"student.0": "teacher.2"}, loss="cosine")
FeatureDistillation(pairs={'student.0': 'teacher.2'}, loss='cosine', weight=1.0)
>>> MixupTransfer(size=32)
MixupTransfer(size=32, seed=0)
>>> MixupTransfer(size=0)
Traceback (most recent call last):
    ...
ValueError: Expected argument `size` to be an int >= 1, but got 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from litcompress._validation import check_choice, check_int, check_real, fail

__all__ = ["FEATURE_LOSSES", "FeatureDistillation", "MixupTransfer"]

FEATURE_LOSSES = ("mse", "cosine", "attention")
"""The feature losses: mean squared error, cosine distance, attention transfer (conv feature maps)."""


@dataclass(frozen=True)
class FeatureDistillation:
    """Distil intermediate features as well as outputs.

    Outputs of the named layers are captured with forward hooks; a learnable adapter (part of the
    ``DistillationModule``, trained with the student, saved in checkpoints) maps the student's width to the
    teacher's. The term ``weight * loss`` is added to the distillation loss and logged as ``train/feature_loss``.

    Args:
        pairs: ``{"student.layer": "teacher.layer", ...}`` (the ``student.`` / ``teacher.`` prefixes are optional);
            checked against both models when the module is built.
        loss: ``"mse"``, ``"cosine"``, or ``"attention"`` (attention transfer, Zagoruyko & Komodakis, for conv
            feature maps: no adapter needed).
        weight: weight of the feature term, ``>= 0``.
    """

    pairs: Mapping[str, str] = field(default_factory=dict)
    loss: Literal["mse", "cosine", "attention"] = "mse"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.pairs.items()):
            fail("pairs", "a mapping of student layer names to teacher layer names", self.pairs, exc=TypeError,
                 hint='e.g. {"student.features.3": "teacher.features.6"}')
        if not self.pairs:
            fail("pairs", "a non-empty mapping of student layer names to teacher layer names", dict(self.pairs))
        check_choice("loss", self.loss, FEATURE_LOSSES)
        check_real("weight", self.weight, strict=False)


@dataclass(frozen=True)
class MixupTransfer:
    """An extra transfer set: each training step adds ``size`` inputs, each a random convex mix of two inputs of the
    batch, labelled by the teacher only. Its distillation term is added with weight ``alpha`` and logged as
    ``train/transfer_loss``. Floating-point inputs only (token ids cannot be mixed).

    Args:
        size: extra inputs per training step.
        seed: seed of the draws (with ``global_step``: identical on resume and on every process).
    """

    size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("size", self.size, minimum=1)
        check_int("seed", self.seed)
