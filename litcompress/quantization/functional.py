"""Fake quantization in pure torch: quantize-dequantize with straight-through gradients.

One rounding rule everywhere: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` (divide by the scale and
round half to even, as ONNX ``QuantizeLinear`` does), ``x_hat = (q - zero_point) * scale``. Gradients pass
straight through inside the representable range and are zero outside it (as the aten fake-quant ops do). One
autograd function computes it in a single buffer, faster on CPU than ``torch.fake_quantize_*``.

>>> import torch
>>> x = torch.tensor([-1.0, -0.26, 0.0, 0.3, 5.0])
>>> fake_quantize(x, torch.tensor(0.1), None, -127, 127)
tensor([-1.0000, -0.3000,  0.0000,  0.3000,  5.0000])
>>> qmin, qmax = signed_range(8)
>>> qmin, qmax
(-127, 127)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from litcompress._validation import fail

__all__ = [
    "affine_qparams",
    "fake_quantize",
    "grad_scale",
    "lsq_fake_quantize",
    "power_of_two",
    "round_ste",
    "signed_range",
    "symmetric_scale",
    "unsigned_range",
]


def signed_range(bits: int) -> tuple[int, int]:
    """Symmetric signed integer range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``: zero is exact and the grid is symmetric."""
    if not 2 <= bits <= 8:
        fail("bits", "an int in [2, 8]", bits)
    top = 2 ** (bits - 1) - 1
    return -top, top


def unsigned_range(bits: int) -> tuple[int, int]:
    """Unsigned activation range ``[0, 2^b - 1]``."""
    if not 2 <= bits <= 8:
        fail("bits", "an int in [2, 8]", bits)
    return 0, 2**bits - 1


def _shape_for(scale: Tensor, x: Tensor, axis: int | None) -> Tensor:
    if axis is None or scale.dim() == 0:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize in one buffer (4 in-place passes); the gradient passes straight through, masked to
    the elements that were inside the integer range when ``clip`` is set (activations)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                clip: bool) -> Tensor:
        q = torch.div(x, scale).round_()
        if zero_point is not None:
            q.add_(zero_point)
        if clip:
            ctx.save_for_backward((q >= qmin) & (q <= qmax))
        q.clamp_(qmin, qmax)
        if zero_point is not None:
            q.sub_(zero_point)
        ctx.clip = clip
        return q.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        if ctx.clip:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None, None


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, axis: int | None = None,
    clip_grad: bool = True,
) -> Tensor:
    """Quantize-dequantize ``x`` with a straight-through gradient (zero outside the representable range).

    Args:
        x: any tensor.
        scale: a scalar, or one scale per slice along ``axis``.
        zero_point: integer-valued tensor shaped like ``scale``, or ``None`` for 0 (symmetric).
        qmin: smallest integer.
        qmax: largest integer.
        axis: the channel axis of per-channel ``scale``; ``None`` for per-tensor.
        clip_grad: zero the gradient where ``x`` falls outside the range (as the aten fake-quant ops do); not
            needed when the scale covers every element (weights scaled by their max).
    """
    s = _shape_for(scale, x, axis).to(x.dtype)
    z = None if zero_point is None else _shape_for(zero_point, x, axis).to(x.dtype)
    return _FakeQuantize.apply(x, s, z, qmin, qmax, clip_grad)


def symmetric_scale(w: Tensor, qmax: int, axis: int | None = 0, eps: float = 1e-12) -> Tensor:
    """``max|w| / qmax`` per slice along ``axis`` (or for the whole tensor): the grid covers every weight.

    Args:
        w: the weight (any shape); it is detached, the scale carries no gradient.
        qmax: the largest integer of the grid, e.g. ``signed_range(bits)[1]``.
        axis: the axis with one scale per slice (default 0: per output channel of a ``Linear`` or ``Conv``
            weight); ``None`` for one scale for the whole tensor.
        eps: the smallest scale returned (an all-zero slice gets ``eps``, never 0).

    >>> symmetric_scale(torch.tensor([[1.0, -2.54], [0.5, 0.1]]), 127)
    tensor([0.0200, 0.0039])
    """
    w = w.detach()
    dims = list(range(w.dim())) if axis is None else [d for d in range(w.dim()) if d != axis]
    amax = w.abs().amax(dim=dims)
    return torch.clamp(amax.float() / qmax, min=eps)


def power_of_two(scale: Tensor) -> Tensor:
    """Round scales up to powers of two (``2^-p``): integer weights become ``round(w * 2^p)``.

    >>> power_of_two(torch.tensor([0.3, 0.02]))
    tensor([0.5000, 0.0312])
    """
    return torch.exp2(torch.ceil(torch.log2(scale)))


def affine_qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Scale and zero point mapping ``[min(lo, 0), max(hi, 0)]`` onto ``[qmin, qmax]`` (zero is exact).

    Args:
        lo: the observed minimum, a scalar tensor or one per channel.
        hi: the observed maximum, shaped like ``lo``.
        qmin: the smallest integer.
        qmax: the largest integer.
        eps: the smallest scale returned (an empty range ``lo == hi == 0`` gets ``eps``, never 0).

    >>> affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255)
    (tensor(0.0157), tensor(64, dtype=torch.int32))
    """
    lo, hi = torch.clamp(lo.float(), max=0.0), torch.clamp(hi.float(), min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def round_ste(x: Tensor) -> Tensor:
    """``round`` with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Identity forward; the gradient is multiplied by ``factor``."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def lsq_fake_quantize(
    x: Tensor, scale: Tensor, qmin: int, qmax: int, axis: int | None = None, zero_point: Tensor | None = None,
    n: int | None = None,
) -> Tensor:
    """LSQ (Esser et al. 2020): fake quantization whose ``scale`` receives a gradient, scaled by
    ``g = 1 / sqrt(n * qmax)`` with ``n`` the number of elements one scale covers (default: all of them).

    The rounding rule matches :func:`fake_quantize`; ``zero_point`` (fixed, not learned) defaults to 0.

    Args:
        x: any tensor; its gradient passes straight through inside the range and is zero outside it.
        scale: the learned step size (usually a parameter): a scalar, or one per slice along ``axis``.
        qmin: smallest integer.
        qmax: largest integer.
        axis: the channel axis of per-channel ``scale``; ``None`` for per-tensor.
        zero_point: integer-valued tensor shaped like ``scale``, or ``None`` for 0 (symmetric).
        n: the number of elements one scale covers, for the gradient factor ``g``; default
            ``x.numel() // scale.numel()``.

    >>> s = torch.tensor(0.1, requires_grad=True)
    >>> lsq_fake_quantize(torch.tensor([0.26, -0.04]), s, -127, 127).sum().backward()
    >>> round(float(s.grad), 4)  # sum of round(v) - v for v = x / s: (3 - 2.6) + (0 + 0.4), times 1/sqrt(2 * 127)
    0.0502
    """
    n = n if n is not None else x.numel() // max(scale.numel(), 1)
    s = grad_scale(scale, 1.0 / math.sqrt(n * qmax))
    s = _shape_for(s, x, axis).to(x.dtype)
    z = 0.0 if zero_point is None else _shape_for(zero_point, x, axis).to(x.dtype)
    return (round_ste(torch.clamp(x / s + z, qmin, qmax)) - z) * s
