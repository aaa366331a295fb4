"""Stateful quantizers for one weight tensor or one activation, and the config they share.

Their state (ranges, learned scales) lives in plain attributes, never in registered buffers or parameters, so a
model's ``state_dict`` keys do not change; :meth:`state_dict` exposes it for the callback's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from litcompress._validation import _check_choice, _check_fraction, _check_int, _fail
from litcompress.quantization.fake_quant import (
    affine_qparams,
    fake_quantize,
    lsq_fake_quantize,
    power_of_two,
    signed_range,
    symmetric_scale,
    unsigned_range,
)

__all__ = ["ActivationQuantizer", "QuantConfig", "WeightQuantizer"]

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: shared by every layer one callback converts.

    Attributes:
        weight_bits: 2..8; weights are symmetric, signed, on ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero is exact).
        weight_granularity: ``"per_channel"`` (one scale per output channel / row) or ``"per_tensor"``.
        activation_bits: 2..8 (unsigned, asymmetric, per tensor) or ``None`` for weight-only quantization.
        scale: ``"minmax"`` (weights: current max|w|; activations: EMA of min/max), ``"power_of_two"`` (those
            scales rounded up to ``2^-p``), or ``"learned"`` (LSQ step sizes, initialised from the former).
        momentum: weight of a new batch in the activation EMA.
    """

    weight_bits: int = 8
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    activation_bits: int | None = 8
    scale: Literal["minmax", "power_of_two", "learned"] = "minmax"
    momentum: float = 0.01

    def __post_init__(self) -> None:
        _check_int("weight_bits", self.weight_bits)
        signed_range(self.weight_bits)
        _check_choice("weight_granularity", self.weight_granularity, ("per_channel", "per_tensor"))
        if self.activation_bits is not None:
            _check_int("activation_bits", self.activation_bits)
            unsigned_range(self.activation_bits)
        _check_choice("scale", self.scale, ("minmax", "power_of_two", "learned"))
        _check_fraction("momentum", self.momentum, closed_right=True)
        if self.momentum == 0:
            _fail("momentum", "a float in (0, 1]", self.momentum)


class WeightQuantizer:
    """Fake-quantizes one weight tensor (symmetric; per channel along ``axis`` or per tensor)."""

    def __init__(self, config: QuantConfig, name: str, axis: int = 0) -> None:
        self.config, self.name = config, name
        self.axis = axis if config.weight_granularity == "per_channel" else None
        self.qmin, self.qmax = signed_range(config.weight_bits)
        self.scale: Tensor | None = None  # frozen or learned scale; None: computed from the weights each call
        self.frozen = False

    def observed_scale(self, w: Tensor) -> Tensor:
        scale = symmetric_scale(w, self.qmax, self.axis)
        return power_of_two(scale) if self.config.scale == "power_of_two" else scale

    def init_learned(self, w: Tensor) -> Tensor:
        """Create the LSQ step size from the current weights; returns the leaf tensor to optimize."""
        self.scale = self.observed_scale(w).clone().requires_grad_(True)
        return self.scale

    def freeze(self, w: Tensor) -> None:
        """Stop following the weights: keep the current scale (learned scales keep learning)."""
        if self.scale is None:
            self.scale = self.observed_scale(w)
        self.frozen = True

    def current_scale(self, w: Tensor) -> Tensor:
        return self.scale.detach() if self.scale is not None else self.observed_scale(w)

    def __call__(self, w: Tensor) -> Tensor:
        if self.config.scale == "learned" and self.scale is not None and self.scale.requires_grad:
            return lsq_fake_quantize(w, self.scale.to(w.device), self.qmin, self.qmax, self.axis)
        scale = self.current_scale(w).to(w.device)
        return fake_quantize(w, scale, torch.zeros_like(scale, dtype=torch.int32), self.qmin, self.qmax, self.axis)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": None if self.scale is None else self.scale.detach().clone(), "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scale = state.get("scale")
        if scale is not None and self.scale is not None and self.scale.requires_grad:
            with torch.no_grad():  # keep the same leaf tensor: the optimizer points at it
                self.scale.copy_(scale)
        else:
            self.scale = scale
        self.frozen = bool(state.get("frozen", False))


class ActivationQuantizer:
    """Fake-quantizes one activation (asymmetric, unsigned, per tensor).

    Ranges are an exponential moving average of each batch's min/max. A forward uses the average so far (the
    first batch uses its own range) and records the batch's range; :meth:`commit` folds the recorded range into
    the average, after reducing it across processes, so every process quantizes identically.
    """

    def __init__(self, config: QuantConfig, name: str) -> None:
        assert config.activation_bits is not None
        self.config, self.name = config, name
        self.qmin, self.qmax = unsigned_range(config.activation_bits)
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self._batch: tuple[Tensor, Tensor] | None = None
        self.observing = True
        self.scale: Tensor | None = None  # learned step size (LSQ)
        self.zero_point: Tensor | None = None  # fixed when the step size starts learning

    def qparams(self) -> tuple[Tensor, Tensor]:
        lo, hi = (self.lo, self.hi) if self.lo is not None else self._batch  # type: ignore[misc]
        return affine_qparams(lo, hi, self.qmin, self.qmax)

    def __call__(self, x: Tensor, training: bool) -> Tensor:
        if training and self.observing:
            lo, hi = torch.aminmax(x.detach())
            if self._batch is None:
                self._batch = (lo.float(), hi.float())
            else:  # several forwards before a commit (gradient accumulation): widen
                self._batch = (torch.minimum(self._batch[0], lo.float()), torch.maximum(self._batch[1], hi.float()))
        if self.lo is None and self._batch is None:
            _fail("input", f"a batch seen in training before `{self.name}` is used in evaluation", "no range yet",
                  hint="run at least one training step after QAT starts, or restore the callback's state")
        if self.scale is not None and self.scale.requires_grad:
            return lsq_fake_quantize(x, self.scale.to(x.device), self.qmin, self.qmax,
                                     zero_point=self.zero_point.to(x.device), n=x[0].numel() if x.dim() else 1)
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale.to(x.device), zero_point.to(x.device), self.qmin, self.qmax)

    def commit(self, reduce_min: Reduce | None = None, reduce_max: Reduce | None = None) -> None:
        """Fold the recorded batch range into the moving average (after reducing it across processes)."""
        if self._batch is None:
            return
        lo, hi = self._batch
        self._batch = None
        if reduce_min is not None and reduce_max is not None:
            lo, hi = reduce_min(lo), reduce_max(hi)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            _fail("input", f"finite values at the input of `{self.name}`", f"range [{float(lo)}, {float(hi)}]",
                  hint="the layer received inf/NaN; check the data, the learning rate or the loss scale")
        if self.lo is None:
            self.lo, self.hi = lo.clone(), hi.clone()
        else:
            m = self.config.momentum
            self.lo = self.lo + m * (lo - self.lo)
            self.hi = self.hi + m * (hi - self.hi)

    def init_learned(self) -> Tensor:
        """Create the LSQ step size from the observed range; the zero point is fixed from then on."""
        scale, self.zero_point = self.qparams()
        self.scale = scale.clone().requires_grad_(True)
        return self.scale

    def state_dict(self) -> dict[str, Any]:
        return {
            "lo": self.lo, "hi": self.hi, "observing": self.observing,
            "scale": None if self.scale is None else self.scale.detach().clone(), "zero_point": self.zero_point,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lo, self.hi = state.get("lo"), state.get("hi")
        self.observing = bool(state.get("observing", True))
        self.zero_point = state.get("zero_point")
        scale = state.get("scale")
        if scale is not None and self.scale is not None and self.scale.requires_grad:
            with torch.no_grad():
                self.scale.copy_(scale)
        else:
            self.scale = scale
