"""Low-rank factorization: a Linear (or convolution) replaced by two thinner layers from a truncated SVD.

A weight ``W`` (``out x in``; a convolution's ``out x in*k*k``) is ``U S V^T``; keeping the ``r`` largest singular
values gives ``W_r = (U_r S_r^1/2)(S_r^1/2 V_r^T)``, the best rank-``r`` approximation (Eckart-Young). The layer
becomes :class:`Factorized`: ``first`` (``in -> r``, the layer's kernel, stride and padding, no bias) then ``second``
(``r -> out``, a 1x1 for convolutions, the layer's own bias ``Parameter``). It has ``r * (in + out)`` weights
instead of ``in * out``, so a layer is factorized only when ``r < in * out / (in + out)``.

The rank is chosen per layer by one of ``rank`` (the same for every layer), ``rank_ratio`` (a fraction of the
layer's full rank ``min(out, in)``) or ``energy`` (the smallest rank whose singular values keep that fraction of
``sum(S^2)``, i.e. relative squared reconstruction error ``<= 1 - energy``).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
>>> report = factorize_(model, ["0"], rank=8)
>>> report["0"].rank, report["0"].params_before, report["0"].params_after
(8, 4096, 1024)
>>> type(model[0]).__name__, tuple(model[0].first.weight.shape), tuple(model[0].second.weight.shape)
('Factorized', (8, 64), (64, 8))
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._validation import check_fraction, check_int, fail
from litcompress.layers import HFConv1D
from litcompress.quantization.layers import QuantizedLayer

__all__ = ["Factorized", "LowRankResult", "check_rank", "check_rank_options", "choose_rank", "factorizable",
           "factorize_", "may_factorize", "rank_limit", "tied_to"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Factorized(nn.Sequential):
    """A layer as two thinner ones, ``second(first(x))``; an ordinary module (exports, saves, trains as usual).

    It still answers what code reads from the layer it replaced (Hugging Face's T5 reads ``wo.weight.dtype``, ViT
    ``projection.weight.dtype``): :attr:`weight`, ``bias``, the sizes (``in_features`` / ``out_features`` and
    ``nx`` / ``nf`` for a Linear or transformers ``Conv1D``; ``in_channels`` / ``out_channels`` / ``kernel_size``
    for a convolution), all read from the factors, so they follow the factors' dtype, device and shapes. None of
    them is a Parameter or a buffer: parameter lists, ``state_dict``, optimizers and layer selection see only the
    factors.

    Attributes:
        first: ``in -> rank`` (no bias).
        second: ``rank -> out`` (the original layer's bias).
        transposed: the replaced layer stored its weight ``(in, out)`` (transformers' ``Conv1D``), so
            :attr:`weight` is given in that layout.

    >>> layer = Factorized(nn.Linear(6, 2, bias=False), nn.Linear(2, 4))
    >>> tuple(layer.weight.shape), layer.in_features, layer.out_features, layer.rank, layer.weight.dtype
    ((4, 6), 6, 4, 2, torch.float32)
    >>> x = torch.randn(3, 6)
    >>> torch.allclose(layer(x), x @ layer.weight.t() + layer.bias)
    True
    """

    first: nn.Module
    second: nn.Module

    def __init__(self, first: nn.Module, second: nn.Module, transposed: bool = False) -> None:
        super().__init__(OrderedDict(first=first, second=second))
        self.transposed = transposed

    @property
    def rank(self) -> int:
        return int(_weight(self.first).shape[0])

    @property
    def weight(self) -> Tensor:
        """``second``'s weight times ``first``'s, in the replaced layer's layout: ``(out, in)`` for a Linear,
        ``(out, in, *kernel)`` for a convolution, ``(in, out)`` when :attr:`transposed`.

        Computed on every read (``rank * in * out`` multiply-adds, differentiable: gradients reach the factors): a
        new tensor, not a Parameter, so writing into it changes nothing. Code that only asks its dtype or device
        pays the product too; ``first.weight.dtype`` is free.
        """
        first, second = _weight(self.first), _weight(self.second)
        w = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)  # (out, rank) @ (rank, in*k)
        return w.t() if self.transposed else w.reshape(second.shape[0], *first.shape[1:])

    @property
    def bias(self) -> Tensor | None:
        """The replaced layer's bias (the same Parameter, held by ``second``)."""
        bias = getattr(self.second, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    @property
    def in_features(self) -> int:
        return self._linear_size(1)

    @property
    def out_features(self) -> int:
        return self._linear_size(0)

    @property
    def nx(self) -> int:
        """Inputs, by the name transformers' ``Conv1D`` gives them."""
        return self._linear_size(1)

    @property
    def nf(self) -> int:
        """Outputs, by the name transformers' ``Conv1D`` gives them."""
        return self._linear_size(0)

    @property
    def in_channels(self) -> int:
        return int(self._conv().weight.shape[1])

    @property
    def out_channels(self) -> int:
        self._conv()
        return int(_weight(self.second).shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self._conv().kernel_size)

    def _linear_size(self, end: int) -> int:
        """Outputs (``end=0``, rows of ``second``) or inputs (``end=1``, columns of ``first``) of a Linear pair."""
        if isinstance(self.first, _CONV):
            raise AttributeError(f"a factorized {type(self.first).__name__} has channels, not features")
        return int(_weight(self.second if end == 0 else self.first).shape[end])

    def _conv(self) -> nn.modules.conv._ConvNd:
        if not isinstance(self.first, _CONV):
            raise AttributeError("a factorized Linear has features, not channels")
        return self.first

    def extra_repr(self) -> str:
        return "transposed=True" if self.transposed else ""

    @classmethod
    def like(cls, layer: nn.Module, rank: int) -> Factorized:
        """An uninitialized factorization of ``layer``'s shape at ``rank`` (its weights are to be loaded)."""
        weight = layer.weight
        assert isinstance(weight, Tensor)
        device, dtype = weight.device, weight.dtype
        first: nn.Module
        second: nn.Module
        if isinstance(layer, _CONV):
            conv: Any = type(layer)
            first = conv(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                         bias=False, padding_mode=layer.padding_mode, device=device, dtype=dtype)
            second = conv(rank, layer.out_channels, 1, bias=layer.bias is not None, device=device, dtype=dtype)
        else:
            n_in, n_out = _dims(layer)
            first = nn.Linear(n_in, rank, bias=False, device=device, dtype=dtype)
            second = nn.Linear(rank, n_out, bias=layer.bias is not None, device=device, dtype=dtype)
        if layer.bias is not None:
            second.bias = layer.bias  # the same Parameter: optimizers keep it and its state
        return cls(first, second, transposed=isinstance(layer, HFConv1D))


@dataclass(frozen=True)
class LowRankResult:
    """What :func:`factorize_` did to one layer.

    Attributes:
        rank: the rank chosen (the full rank when the layer was kept).
        full_rank: ``min(out, in)``.
        params_before: weights of the layer (bias not counted: it is kept as is).
        params_after: weights after (``params_before`` when kept).
        error: relative reconstruction error ``||W - W_r||_F / ||W||_F`` (0 when kept).
        factorized: whether the layer was replaced (False when the rank would not cut its weights).
    """

    rank: int
    full_rank: int
    params_before: int
    params_after: int
    error: float
    factorized: bool


def _weight(layer: nn.Module) -> Tensor:
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return weight


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the layer's weight as a matrix (a convolution's inputs include its kernel)."""
    weight = _weight(layer)
    if isinstance(layer, HFConv1D):  # weight (in, out)
        return int(weight.shape[0]), int(weight.shape[1])
    return math.prod(weight.shape[1:]), int(weight.shape[0])


def _matrix(layer: nn.Module) -> Tensor:
    w = _weight(layer).detach().float()
    return w.t() if isinstance(layer, HFConv1D) else w.reshape(w.shape[0], -1)


def factorizable(layer: nn.Module) -> str | None:
    """``None`` when ``layer`` can be factorized, else why not."""
    if isinstance(layer, Factorized):
        return "it is already factorized"
    if isinstance(layer, _CONV):
        if layer.groups != 1:
            return "it is a grouped convolution"
        return None
    if isinstance(layer, QuantizedLayer):
        return "it is quantized for training (factorize before QuantizationAwareTraining converts it)"
    if isinstance(layer, (nn.Linear, HFConv1D)):
        return None
    return f"it is a {type(layer).__name__}, not a Linear, an ungrouped convolution or a transformers Conv1D"


def tied_to(model: nn.Module, name: str) -> str | None:
    """``None`` unless layer ``name``'s weight is also another module's (a tied embedding and LM head): then why
    it cannot be factorized (its replacement would untie them)."""
    weight = model.get_submodule(name).weight
    others = [n for n, m in model.named_modules() if n != name
              and any(p is weight for p in m.parameters(recurse=False))]
    return f"its weight is tied to {', '.join(others)}; factorizing it would untie them" if others else None


def rank_limit(layer: nn.Module) -> int:
    """The largest rank of ``layer``'s weight, ``min(out, in)``."""
    return min(_dims(layer))


def may_factorize(layer: nn.Module, rank: int | None = None, rank_ratio: float | None = None,
                  energy: float | None = None) -> bool:
    """Whether :func:`factorize_` with these options may replace ``layer`` (else it surely keeps it dense).

    With ``rank`` or ``rank_ratio`` the rank follows from the layer's shape, so the answer is exact: the rank cuts
    its weights, ``rank * (in + out) < in * out``. With ``energy`` the rank depends on the weights when they are
    factorized, so the answer is whether the smallest rank, 1, would cut them.

    Args:
        layer: a Linear, ungrouped convolution or transformers ``Conv1D``.
        rank: a fixed rank (capped at ``min(out, in)``).
        rank_ratio: a fraction of the full rank, as in :func:`factorize_`.
        energy: a fraction of the squared singular values, as in :func:`factorize_`. Pass exactly one of the three.

    >>> may_factorize(nn.Linear(64, 64), rank=31), may_factorize(nn.Linear(64, 64), rank=32)
    (True, False)
    >>> may_factorize(nn.Linear(64, 4), energy=0.9)  # 1 * (64 + 4) < 64 * 4: depends on the weights
    True
    """
    check_rank_options(rank, rank_ratio, energy)
    full = rank_limit(layer)
    # a fixed rank or ratio reads only how many singular values there are
    r = 1 if energy is not None else choose_rank(torch.ones(full), rank=rank, rank_ratio=rank_ratio)
    return _cuts(layer, r)


def _cuts(layer: nn.Module, rank: int) -> bool:
    n_in, n_out = _dims(layer)
    return rank * (n_in + n_out) < n_in * n_out


def check_rank(name: str, layer: nn.Module, rank: int | None) -> None:
    """A fixed ``rank`` fits layer ``name``: at most ``min(out, in)`` of its weight.

    Args:
        name: the layer's qualified name in its model, for the error message.
        layer: the layer (a Linear, ungrouped convolution or transformers ``Conv1D``).
        rank: the fixed rank asked for; ``None`` (the rank chosen by ratio or energy) always fits.

    Raises:
        ValueError: ``rank`` is larger than ``min(out, in)``.
    """
    if rank is not None and rank > rank_limit(layer):
        fail("rank", f"at most {rank_limit(layer)} for layer `{name}` (the smaller of its outputs and inputs)", rank,
             hint="lower `rank`, use `rank_ratio` / `energy`, or add the layer to `exclude`")


def choose_rank(singular_values: Tensor, rank: int | None = None, rank_ratio: float | None = None,
                energy: float | None = None) -> int:
    """The rank kept from ``singular_values`` (descending) by exactly one of ``rank``, ``rank_ratio``, ``energy``.

    Args:
        singular_values: the weight's singular values, 1-D, in descending order.
        rank: a fixed rank, capped at the number of singular values; when given, the other two are ignored.
        rank_ratio: a fraction of the full rank, rounded up and at least 1; used when ``rank`` is ``None``.
        energy: the smallest rank whose squared singular values keep this fraction of their sum (1 when all are
            zero); used when ``rank`` and ``rank_ratio`` are ``None``. The options are checked by
            :func:`check_rank_options`, not here.

    >>> choose_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), energy=0.9)  # 9 + 4 = 13 of 14
    2
    """
    full = int(singular_values.numel())
    if rank is not None:
        return min(rank, full)
    if rank_ratio is not None:
        return max(1, min(full, math.ceil(rank_ratio * full)))
    assert energy is not None
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return min(full, int((kept < energy - 1e-12).sum()) + 1)


def check_rank_options(rank: int | None, rank_ratio: float | None, energy: float | None) -> None:
    """Exactly one of ``rank`` (an int >= 1), ``rank_ratio`` and ``energy`` (each in ``(0, 1]``) is given.

    Args:
        rank: the same rank for every layer, or ``None``.
        rank_ratio: the fraction of each layer's full rank ``min(out, in)`` to keep, or ``None``.
        energy: the fraction of each weight's squared singular values to keep, or ``None``.

    Raises:
        TypeError: none of the three is given, or the one given has the wrong type.
        ValueError: more than one is given, or the one given is out of its range.
    """
    given = [n for n, v in (("rank", rank), ("rank_ratio", rank_ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        fail("rank", "exactly one of `rank`, `rank_ratio`, `energy`", {n: v for n, v in (
            ("rank", rank), ("rank_ratio", rank_ratio), ("energy", energy))}, exc=TypeError if not given else
             ValueError, hint="e.g. energy=0.9 keeps 90% of each weight's squared singular values")
    check_int("rank", rank, minimum=1, allow_none=True)
    if rank_ratio is not None:
        check_fraction("rank_ratio", rank_ratio, closed_right=True)
        if rank_ratio <= 0:
            fail("rank_ratio", "a float in the (0, 1] range", rank_ratio)
    if energy is not None:
        check_fraction("energy", energy, closed_right=True)
        if energy <= 0:
            fail("energy", "a float in the (0, 1] range", energy)


@torch.no_grad()
def factorize_(model: nn.Module, layers: Sequence[str], *, rank: int | None = None, rank_ratio: float | None = None,
               energy: float | None = None) -> dict[str, LowRankResult]:
    """Replace each of ``layers`` in ``model`` by its truncated SVD, where that cuts its weights.

    Every layer is checked before any is replaced (all or nothing). Returns one :class:`LowRankResult` per layer.

    Args:
        model: the model, changed in place (each factorized layer becomes a :class:`Factorized`).
        layers: qualified names of layers of ``model`` (as in ``named_modules()``): Linear layers, ungrouped
            convolutions or transformers ``Conv1D`` layers whose weight is not tied to another module's. A layer
            whose chosen rank would not cut its weights is kept (``factorized=False`` in its result).
        rank: the same rank for every layer (at most each layer's ``min(out, in)``).
        rank_ratio: the fraction of each layer's full rank ``min(out, in)`` to keep, rounded up.
        energy: the fraction of each weight's squared singular values to keep (relative squared reconstruction
            error at most ``1 - energy``). Pass exactly one of ``rank``, ``rank_ratio`` and ``energy``.
    """
    check_rank_options(rank, rank_ratio, energy)
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            fail("layers", "names of layers of the model", name)
        why = factorizable(modules[name]) or tied_to(model, name)
        if why is not None:
            fail("layers", "Linear layers, ungrouped convolutions or transformers Conv1D layers", name, hint=why)
        check_rank(name, modules[name], rank)
    report = {}
    for name in layers:
        layer = modules[name]
        u, s, vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
        r = choose_rank(s, rank, rank_ratio, energy)
        n_in, n_out = _dims(layer)
        before = n_in * n_out
        total = float((s.double() ** 2).sum())
        error = math.sqrt(float((s[r:].double() ** 2).sum()) / total) if total else 0.0
        if not _cuts(layer, r):
            report[name] = LowRankResult(len(s), len(s), before, before, 0.0, False)
            continue
        root = s[:r].sqrt()
        new = Factorized.like(layer, r)
        first, second = _weight(new.first), _weight(new.second)
        first.copy_((root[:, None] * vh[:r]).reshape(first.shape))
        second.copy_((u[:, :r] * root[None, :]).reshape(second.shape))
        model.set_submodule(name, new)
        modules[name] = new
        report[name] = LowRankResult(r, len(s), before, r * (n_in + n_out), error, True)
    return report
