"""Stateful quantizers for one weight tensor or one activation, and the config they share.

Their state (ranges, learned scales) lives in plain attributes, never in registered buffers or parameters, so a
model's ``state_dict`` keys do not change; :meth:`state_dict` exposes it for the callback's checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from litcompress._compat import qdq_ops
from litcompress._shards import is_dtensor
from litcompress._validation import check_choice, check_fraction, check_int, fail, fail_state
from litcompress.quantization.functional import (
    affine_qparams,
    fake_quantize,
    lsq_fake_quantize,
    power_of_two,
    signed_range,
    symmetric_scale,
    unsigned_range,
)

__all__ = ["ActivationQuantizer", "QuantConfig", "WeightQuantizer"]


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: shared by every layer one callback converts.

    Attributes:
        weight_bits: 2..8; weights are symmetric, signed, on ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero is exact).
        weight_granularity: ``"per_channel"`` (one scale per output channel / row) or ``"per_tensor"``.
        activation_bits: 2..8 (unsigned, asymmetric, per tensor) or ``None`` for weight-only quantization.
        scale: ``"minmax"`` (weights: current max|w|; activations: EMA of min/max), ``"power_of_two"`` (those
            scales rounded up to ``2^-p``), or ``"learned"`` (LSQ step sizes, initialised from the former).
        averaging_constant: weight of a new batch in the observers' moving average of activation ranges (the name
            torch.ao's ``MovingAverageMinMaxObserver`` uses), in ``(0, 1]``.
    """

    weight_bits: int = 8
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    activation_bits: int | None = 8
    scale: Literal["minmax", "power_of_two", "learned"] = "minmax"
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        check_int("weight_bits", self.weight_bits)
        if not 2 <= self.weight_bits <= 8:
            fail("weight_bits", "an int in [2, 8]", self.weight_bits)
        check_choice("weight_granularity", self.weight_granularity, ("per_channel", "per_tensor"))
        if self.activation_bits is not None:
            check_int("activation_bits", self.activation_bits)
            if not 2 <= self.activation_bits <= 8:
                fail("activation_bits", "an int in [2, 8] or None", self.activation_bits)
        check_choice("scale", self.scale, ("minmax", "power_of_two", "learned"))
        check_fraction("averaging_constant", self.averaging_constant, closed_right=True)
        if self.averaging_constant == 0:
            fail("averaging_constant", "a float in (0, 1]", self.averaging_constant)


class WeightQuantizer:
    """Fake-quantizes one weight tensor (symmetric; per channel along ``axis`` or per tensor).

    ``axis`` is the weight's output-channel dimension: 0 for ``nn.Linear``/Conv/Embedding, 1 for Hugging Face's
    ``Conv1D`` (weight stored ``(in, out)``). It is used for the scales, the integer weights, the ONNX
    ``DequantizeLinear`` and the compact file alike. One quantizer may serve several layers that share (tie) the
    weight, so every owner sees the same fake-quantized tensor.

    Args:
        config: the quantization settings; this quantizer uses ``weight_bits``, ``weight_granularity`` and
            ``scale``.
        name: the weight's qualified name (e.g. ``"fc1.weight"``), kept as ``self.name`` to identify it.
        axis: the weight's output-channel dimension (see above); ignored (one scale for the whole tensor) when
            ``config.weight_granularity`` is ``"per_tensor"``.

    >>> q = WeightQuantizer(QuantConfig(), "w", axis=1)
    >>> ints, scale = q.integers(torch.tensor([[1.0, -0.5], [-2.0, 0.25]]))
    >>> ints.tolist(), scale.shape  # one scale per column: per output channel of an (in, out) weight
    ([[64, -127], [-127, 64]], torch.Size([2]))
    """

    def __init__(self, config: QuantConfig, name: str, axis: int = 0) -> None:
        self.config, self.name = config, name
        self.axis = axis if config.weight_granularity == "per_channel" else None
        self.qmin, self.qmax = signed_range(config.weight_bits)
        self.scale: Tensor | None = None  # frozen or learned scale; None: computed from the weights each call
        self.frozen = False
        self._export: tuple[Tensor, Tensor, Tensor] | None = None  # (integer weights, scales, zeros) while exporting

    def observed_scale(self, w: Tensor) -> Tensor:
        scale = symmetric_scale(w, self.qmax, self.axis)
        if is_dtensor(scale):  # FSDP2 shards, outside forward: each process reduces its rows, then one collective
            scale = scale.full_tensor()  # one scale per channel, never the weight
        return power_of_two(scale) if self.config.scale == "power_of_two" else scale

    def placeholder(self, w: Tensor) -> Tensor:
        """The LSQ step size as an idle leaf tensor, to hand to an optimizer before learning starts."""
        self.scale = torch.ones(w.shape[self.axis] if self.axis is not None else (), device=w.device)
        return self.scale

    def keep_channels(self, kept: Mapping[int, Tensor]) -> None:
        """Keep only the per-channel scales of the channels its weight keeps, after channels were removed from it:
        ``kept`` maps a weight dimension to the positions kept along it. A computed or per-tensor scale needs
        nothing."""
        if self.scale is not None and self.axis is not None and self.axis in kept:
            self.scale = self.scale.index_select(self.axis, kept[self.axis].to(self.scale.device))

    @torch.no_grad()
    def start_learning(self, w: Tensor) -> None:
        """Initialise the (placeholder) step size from the current weights and let it learn."""
        scale = self.placeholder(w) if self.scale is None else self.scale
        scale.copy_(self.observed_scale(w))
        scale.requires_grad_(True)

    def freeze(self, w: Tensor) -> None:
        """Stop following the weights: keep the current scale (learned scales keep learning)."""
        if self.scale is None:
            self.scale = self.observed_scale(w)
        self.frozen = True

    def current_scale(self, w: Tensor) -> Tensor:
        """The scale in use: the learned or frozen one, else one computed from the weights now."""
        if self.scale is not None and (self.frozen or self.scale.requires_grad):
            return self.scale.detach()
        return self.observed_scale(w)

    @torch.no_grad()
    def integers(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The integer weights (``int8``) and their scales: what a deployed model stores."""
        scale = self.current_scale(w).float()
        shaped = scale
        if scale.dim() and self.axis is not None:
            shape = [1] * w.dim()
            shape[self.axis] = -1
            shaped = scale.reshape(shape)
        q = torch.clamp(torch.round(w.detach().float() / shaped), self.qmin, self.qmax).to(torch.int8)
        return q, scale

    @property
    def exporting(self) -> bool:
        """Whether :meth:`begin_export` froze the integer weights into constants for an ONNX export."""
        return self._export is not None

    @property
    def export_zero_point(self) -> int:
        """The zero point of the exported weights: 128 (stored ``uint8``) for 8-bit weights, 0 (``int8``) for fewer.

        Both store exactly the values training used (``uint8`` ``q + 128`` with zero point 128 dequantizes to what
        ``int8`` ``q`` does), but ONNX Runtime runs them on different kernels. For ``uint8`` activations times
        ``int8`` weights (U8S8) on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), MLAS uses ``VPMADDUBSW``,
        which adds two ``u8 * s8`` products in a saturating ``int16``: ``2 * 255 * 127`` exceeds ``32767``, so
        8-bit weights give silently wrong outputs there. ``uint8`` weights (U8U8) run on exact kernels on every
        CPU. Weights of at most 7 bits (``|q| <= 63``, ``2 * 255 * 63 <= 32767``) cannot saturate and stay
        ``int8``, the fastest on every CPU (VNNI and AMX kernels are U8S8).

        >>> [WeightQuantizer(QuantConfig(weight_bits=b), "w").export_zero_point for b in (8, 7)]
        [128, 0]
        """
        return 128 if 2 * 255 * self.qmax > 32767 else 0

    def begin_export(self, w: Tensor) -> None:
        """Until :meth:`end_export`, return ``DequantizeLinear`` of the integer weights of ``w`` (as constants),
        stored as :attr:`export_zero_point` says."""
        ints, scale = self.integers(w)
        zero_point = self.export_zero_point
        if zero_point:  # the same values, stored uint8: q + 128 with zero point 128
            ints = (ints.to(torch.int16) + zero_point).to(torch.uint8)
        self._export = (ints, scale, torch.full_like(scale, zero_point, dtype=torch.int64))

    def end_export(self) -> None:
        self._export = None

    def __call__(self, w: Tensor) -> Tensor:
        if self._export is not None:  # Q/DQ graph for ONNX: DequantizeLinear on an int8 or uint8 initializer
            q, scale, zeros = self._export
            zero_point = self.export_zero_point
            lo, hi = self.qmin + zero_point, self.qmax + zero_point
            if scale.dim():
                axis = 0 if self.axis is None else self.axis
                return qdq_ops().dequantize_per_channel(q, scale, zeros, axis, lo, hi, q.dtype)
            return qdq_ops().dequantize_per_tensor(q, float(scale), zero_point, lo, hi, q.dtype)
        if self.scale is not None and self.scale.requires_grad:
            return lsq_fake_quantize(w, self.scale, self.qmin, self.qmax, self.axis)
        scale = self.current_scale(w).to(w.device)
        # a scale taken from max|w| covers every weight: no clipping, no gradient mask
        return fake_quantize(w, scale, None, self.qmin, self.qmax, self.axis, clip_grad=self.scale is not None)

    def rows(self, w: Tensor, index: Tensor) -> Tensor:
        """``self(w)[index]`` for an embedding lookup, computing only the rows looked up (per-row scales of the
        looked-up rows are those of the whole tensor; a per-tensor scale still comes from all of ``w``). Learned
        step sizes and export take the whole tensor."""
        if self._export is not None or (self.scale is not None and self.scale.requires_grad) or self.axis not in (
                0, None):
            return self(w)[index]
        picked = w[index]
        if self.axis is None:
            scale = self.current_scale(w).to(w.device)
        elif self.scale is not None and self.frozen:
            scale = self.scale.detach().to(w.device)[index]
        else:
            scale = self.observed_scale(picked.reshape(-1, *w.shape[1:])).reshape(index.shape)
        flat = picked.reshape(-1, *w.shape[1:])
        out = fake_quantize(flat, scale.reshape(-1) if scale.dim() else scale, None, self.qmin, self.qmax,
                            0 if scale.dim() else None, clip_grad=self.scale is not None)
        return out.reshape(picked.shape)

    def state_dict(self) -> dict[str, Any]:
        return _scale_state(self.scale) | {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = _load_scale(self.scale, state)
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
        self._export: tuple[float, int] | None = None  # (scale, zero point) while exporting

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point in use (learned ones once learning, else from the observed range)."""
        if self.learning:
            assert self.scale is not None and self.zero_point is not None  # set together by `start_learning`
            return self.scale.detach(), self.zero_point
        if self.lo is not None:
            assert self.hi is not None  # `lo` and `hi` are set together
            return affine_qparams(self.lo, self.hi, self.qmin, self.qmax)
        assert self._batch is not None, "no activation range observed yet"  # callers check `ready` first
        return affine_qparams(*self._batch, self.qmin, self.qmax)

    @property
    def ready(self) -> bool:
        """Whether a range (observed or learned) exists, so the quantizer can run in evaluation or export."""
        return self.lo is not None or self.learning

    def begin_export(self) -> None:
        """Until :meth:`end_export`, quantize with constant parameters (a QuantizeLinear/DequantizeLinear pair)."""
        scale, zero_point = self.qparams()
        self._export = (float(scale), int(zero_point))

    def end_export(self) -> None:
        self._export = None

    def __call__(self, x: Tensor, training: bool) -> Tensor:
        if self._export is not None:  # Q/DQ pair for ONNX: QuantizeLinear -> DequantizeLinear
            fixed_scale, fixed_zero_point = self._export
            q = qdq_ops().quantize_per_tensor(x, fixed_scale, fixed_zero_point, self.qmin, self.qmax, torch.uint8)
            return qdq_ops().dequantize_per_tensor(q, fixed_scale, fixed_zero_point, self.qmin, self.qmax,
                                                   torch.uint8)
        if training and self.observing:
            lo, hi = torch.aminmax(x.detach())
            if self._batch is None:
                self._batch = (lo.float(), hi.float())
            else:  # several forwards before a commit (gradient accumulation): widen
                self._batch = (torch.minimum(self._batch[0], lo.float()), torch.maximum(self._batch[1], hi.float()))
        if self.lo is None and self._batch is None:
            fail_state("used in evaluation before any training batch set its activation range", self.name,
                       "run at least one training step after quantization starts, or restore the callback's state")
        if self.learning:
            assert self.scale is not None and self.zero_point is not None  # set together by `start_learning`
            return lsq_fake_quantize(x, self.scale, self.qmin, self.qmax,
                                     zero_point=self.zero_point.to(x.device), n=x[0].numel() if x.dim() else 1)
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale.to(x.device), zero_point.to(x.device), self.qmin, self.qmax)

    @property
    def pending(self) -> tuple[Tensor, Tensor] | None:
        """The range recorded since the last :meth:`commit` (``None`` if nothing was observed)."""
        return self._batch

    def commit(self, lo: Tensor | None = None, hi: Tensor | None = None) -> None:
        """Fold the recorded batch range (or ``lo``/``hi``, e.g. reduced across processes) into the average."""
        if self._batch is None:
            return
        lo = self._batch[0] if lo is None else lo
        hi = self._batch[1] if hi is None else hi
        self._batch = None
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            fail_state(f"non-finite activations (range [{float(lo)}, {float(hi)}]) reached", self.name,
                       "check the data, the learning rate or the loss scale: the layer received inf/NaN")
        if self.lo is None or self.hi is None:  # the first range (`lo` and `hi` are set together)
            self.lo, self.hi = lo.clone(), hi.clone()
        else:
            m = self.config.averaging_constant
            self.lo = self.lo + m * (lo - self.lo)
            self.hi = self.hi + m * (hi - self.hi)

    def placeholder(self, device: torch.device) -> Tensor:
        """The LSQ step size as an idle leaf tensor, to hand to an optimizer before learning starts."""
        self.scale = torch.ones((), device=device)
        return self.scale

    @property
    def learning(self) -> bool:
        return self.scale is not None and self.scale.requires_grad

    @torch.no_grad()
    def start_learning(self) -> None:
        """Initialise the step size from the observed range and let it learn; the zero point is fixed from now."""
        observed, self.zero_point = self.qparams()
        scale = self.placeholder(observed.device) if self.scale is None else self.scale
        scale.copy_(observed)
        scale.requires_grad_(True)

    def state_dict(self) -> dict[str, Any]:
        return _scale_state(self.scale) | {
            "lo": self.lo, "hi": self.hi, "observing": self.observing, "zero_point": self.zero_point,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lo, self.hi = state.get("lo"), state.get("hi")
        self.observing = bool(state.get("observing", True))
        self.zero_point = state.get("zero_point")
        self.scale = _load_scale(self.scale, state)


def _scale_state(scale: Tensor | None) -> dict[str, Any]:
    return {"scale": None if scale is None else scale.detach().clone(),
            "learning": bool(scale is not None and scale.requires_grad)}


def _load_scale(current: Tensor | None, state: dict[str, Any]) -> Tensor | None:
    """Restore a step size into the existing leaf tensor when there is one (an optimizer points at it)."""
    saved = state.get("scale")
    if saved is None:
        return current if current is not None and not current.requires_grad else None
    if current is None or current.shape != saved.shape:
        current = saved.clone()
    else:
        with torch.no_grad():
            current.copy_(saved)
    return current.requires_grad_(bool(state.get("learning", False)))
