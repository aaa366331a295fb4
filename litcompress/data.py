"""Data for distillation without a dataset.

>>> import torch
>>> ds = RandomInputs((3,), size=4, distribution="uniform", low=-1.0, high=1.0, seed=0)
>>> len(ds), ds[0].shape, bool((ds[0] >= -1).all() and (ds[0] <= 1).all())
(4, torch.Size([3]), True)
>>> torch.equal(ds[2], RandomInputs((3,), size=4, distribution="uniform", low=-1.0, high=1.0, seed=0)[2])
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from litcompress._validation import check_choice, check_int, fail

__all__ = ["RandomInputs"]


class RandomInputs(Dataset[Tensor]):
    """Random inputs shaped like a model's input, for label-free distillation (``task_loss=None``).

    Item ``i`` is generated from ``seed`` and ``i`` alone: the same on every run and every process, so a fit
    resumes exactly and a ``DistributedSampler`` shards it like any map-style dataset.

    Args:
        shape: the shape of one input, without the batch dimension.
        size: number of items (an epoch).
        distribution: ``"gaussian"`` (``mean``/``std``), ``"uniform"`` (``low``/``high``), ``"matched"``
            (per-element mean and std of ``reference``, a few real batches), or ``"tokens"`` (integers in
            ``[0, vocab_size)``, for language models).
        reference: real inputs ``(N, *shape)`` for ``"matched"``.
        mean: mean of ``"gaussian"``.
        std: standard deviation of ``"gaussian"``.
        low: lower bound of ``"uniform"``.
        high: upper bound of ``"uniform"``.
        vocab_size: vocabulary of ``"tokens"``.
        seed: base seed.
    """

    def __init__(
        self,
        shape: Sequence[int],
        size: int = 10_000,
        distribution: Literal["gaussian", "uniform", "matched", "tokens"] = "gaussian",
        reference: Tensor | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        low: float = 0.0,
        high: float = 1.0,
        vocab_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(shape, int) or not all(isinstance(d, int) and d > 0 for d in shape):
            fail("shape", "a sequence of positive ints (one input, no batch dimension)", shape, exc=TypeError)
        check_int("size", size, minimum=1)
        check_choice("distribution", distribution, ("gaussian", "uniform", "matched", "tokens"))
        check_int("seed", seed)
        self.shape, self.size, self.distribution, self.seed = tuple(shape), size, distribution, seed
        if distribution == "matched":
            if not isinstance(reference, Tensor) or tuple(reference.shape[1:]) != self.shape or len(reference) < 2:
                got = tuple(reference.shape) if isinstance(reference, Tensor) else reference
                fail("reference", f"a tensor of real inputs shaped (N >= 2, {', '.join(map(str, self.shape))})", got)
            ref = reference.detach().float()
            self.mean, self.std = ref.mean(0), ref.std(0)
        else:
            self.mean, self.std = torch.tensor(float(mean)), torch.tensor(float(std))
        if distribution == "uniform" and not high > low:
            fail("high", f"greater than `low` ({low})", high)
        if distribution == "tokens":
            check_int("vocab_size", vocab_size, minimum=1)
        self.low, self.high, self.vocab_size = float(low), float(high), vocab_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.size:
            raise IndexError(f"RandomInputs index {index} out of range [0, {self.size})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.distribution == "tokens":
            assert self.vocab_size is not None  # required with "tokens" (checked in __init__)
            return torch.randint(0, self.vocab_size, self.shape, generator=g)
        if self.distribution == "uniform":
            return self.low + (self.high - self.low) * torch.rand(self.shape, generator=g)
        return self.mean + self.std * torch.randn(self.shape, generator=g)
