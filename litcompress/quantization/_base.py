"""The mixin every quantization-aware layer class shares (private home of
:class:`~litcompress.quantization.layers.QuantizedLayer`, so the layer modules can all build on it; import it from
:mod:`litcompress.quantization.layers` or :mod:`litcompress.quantization`)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from litcompress.quantization._recompute import wrap_forward
from litcompress.quantization.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["QuantizedLayer", "linear"]


class QuantizedLayer(nn.Module):
    """Mixin of the converted classes: what a converted layer offers besides its original interface.

    Each converted class puts it before the layer class it extends (``class QATLinear(QuantizedLayer, nn.Linear)``);
    it derives from ``nn.Module`` only so that its methods see the ``Module`` interface, and defines no
    ``__init__``: layers are converted by swapping their class (:func:`convert_`), never constructed. (Only
    :class:`QATConv1D` extends no layer class: transformers is never imported; it runs the original's forward.)

    Attributes:
        weight_quantizers: quantizer per weight it fake-quantizes, keyed by attribute (``"weight"``,
            ``"weight_hh_l0"``, ``"out_proj.weight"`` for an attention layer's output projection); a tied weight's
            quantizer is the same object in every layer that holds the weight.
        input_quantizers: quantizer per activation it fake-quantizes (``"input"``; ``"output"`` for convolutions;
            ``"query"``, ``"key"``, ``"value"``, ``"out_proj"`` for attention); empty when weight-only.
        fake_quant_enabled: whether ``forward`` fake-quantizes (off: the original layer's forward, bit for bit).
        original_class: the class the layer had before conversion (what :func:`revert_` restores).
    """

    weight_quantizers: dict[str, WeightQuantizer]
    input_quantizers: dict[str, ActivationQuantizer]
    fake_quant_enabled: bool
    original_class: type[nn.Module]
    recompute_weights: bool = False  # FSDP2: fake-quantized weights recomputed in backward (set by the callback)
    _made: dict[int, tuple[Tensor, Any]] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        wrap_forward(cls)  # FSDP2: fake-quantized weights recomputed in backward when `recompute_weights` is set

    def weight_tensor(self, key: str) -> Tensor:
        """The float weight that ``weight_quantizers[key]`` quantizes (the live ``Parameter``)."""
        owner, _, leaf = key.rpartition(".")
        module = self.get_submodule(owner) if owner else self
        return getattr(module, leaf)

    def _quantize_input(self, key: str, x: Tensor) -> Tensor:
        quantizer = self.input_quantizers.get(key)
        return x if quantizer is None else quantizer(x, self.training)

    def _quantize_weight(self, key: str, w: Tensor) -> Tensor:
        quantizer = self.weight_quantizers.get(key)
        if quantizer is None:
            return w
        q = quantizer(w)
        if self._made is not None and q is not w:  # recomputed in backward rather than saved
            self._made[q.untyped_storage().data_ptr()] = (w, quantizer)
        return q

    def _exporting(self) -> bool:
        return any(q.exporting for q in self.weight_quantizers.values())


def linear(x: Tensor, w: Tensor, b: Tensor | None, exporting: bool) -> Tensor:
    """``x @ w.T + b`` in the form ONNX Runtime runs quantized once exported (``F.linear`` while training)."""
    if not exporting or x.dim() == 2:
        # 2-D: exported as Gemm; ONNX Runtime fuses DQ -> Gemm (-> Relu) -> Q into QGemm with an integer output
        # that feeds the next layer directly (a Gemm whose output is not quantized again stays float)
        return F.linear(x, w, b)
    # N-D: exported as MatMul (+ Add), which ONNX Runtime runs as MatMulIntegerToFloat
    y = x @ w.t()
    return y if b is None else y + b
