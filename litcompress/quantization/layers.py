"""Layers converted in place for quantization-aware training.

:func:`convert_` swaps a layer's class to a subclass (``nn.Linear`` -> :class:`QATLinear`, ...): the object, its
``Parameter`` objects (so optimizers stay valid) and its ``state_dict`` keys stay the same; only ``forward``
changes, to fake-quantize weights and (for Linear, Conv, Hugging Face's Conv1D and attention projections) inputs.
The recurrent layers' classes live in :mod:`~litcompress.quantization.recurrent`, attention's in
:mod:`~litcompress.quantization.attention`, the :class:`QuantizedLayer` mixin they all share in a private module;
all are importable from here.
:func:`revert_` swaps back. Quantizers are plain attributes, not submodules, buffers or parameters. A weight tied
between several converted layers (an embedding and its LM head) has one quantizer, shared by every owner.

>>> import torch
>>> from torch import nn
>>> from litcompress.quantization.quantizers import QuantConfig
>>> model = nn.Sequential(nn.Linear(4, 3))
>>> keys = list(model.state_dict())
>>> layers = convert_(model, QuantConfig(), ["0"])
>>> type(model[0]).__name__, list(model.state_dict()) == keys
('QATLinear', True)
>>> revert_(model[0]); type(model[0]).__name__
'Linear'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litcompress._compat import ATTENTION_OUT_PROJ, conv_forward
from litcompress._validation import fail
from litcompress.layers import HFConv1D
from litcompress.quantization._base import QuantizedLayer, linear
from litcompress.quantization.attention import QATMultiheadAttention
from litcompress.quantization.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer
from litcompress.quantization.recurrent import QATGRU, QATLSTM, QATRNN
from litcompress.selection import weight_attributes

__all__ = [
    "QATGRU",
    "QATLSTM",
    "QATRNN",
    "QUANTIZABLE_KINDS",
    "QATConv1D",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATEmbedding",
    "QATLinear",
    "QATMultiheadAttention",
    "QuantizedLayer",
    "convert_",
    "revert_",
]






class QATLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` converted for quantization-aware training (by :func:`convert_`, never constructed; also the
    output projection of ``nn.MultiheadAttention``). With ``fake_quant_enabled`` its forward fake-quantizes the
    weight (symmetric, per output row or per tensor) and, when ``config.activation_bits`` is set, the input (range
    observed in training mode), then applies ``F.linear``; with it off, exactly ``nn.Linear.forward``. ONNX Runtime
    runs the exported layer as ``QGemm`` (2-D inputs) or ``MatMulIntegerToFloat`` (N-D).

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> layer = convert_(model, QuantConfig(weight_bits=4, activation_bits=None), ["0"])["0"]
    >>> type(layer).__name__, layer.fake_quant_enabled, isinstance(layer, nn.Linear)
    ('QATLinear', False, True)
    >>> layer.fake_quant_enabled = True
    >>> ints, scale = layer.weight_quantizers["weight"].integers(layer.weight)
    >>> int(ints.abs().max())  # 4 bits: integers in [-7, 7], one scale per output row
    7
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(layer(x), x @ (ints * scale[:, None]).T + layer.bias)
    True
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant_enabled:
            return super().forward(x)
        w = self._quantize_weight("weight", self.weight)
        return linear(self._quantize_input("input", x), w, self.bias, self._exporting())


class _QATConv(QuantizedLayer):
    """Input, weight and output quantized: ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv (an integer
    kernel) only when the convolution's output is quantized; BatchNorm then runs on the dequantized output."""

    if TYPE_CHECKING:  # provided by the nn.Conv1d / Conv2d / Conv3d this is combined with
        weight: Tensor
        bias: Tensor | None

        def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant_enabled:
            return super().forward(x)
        w = self._quantize_weight("weight", self.weight)
        y = conv_forward(self, self._quantize_input("input", x), w)
        return self._quantize_input("output", y)


class QATConv1d(_QATConv, nn.Conv1d):
    """``nn.Conv1d`` converted for quantization-aware training (by :func:`convert_`, never constructed). With
    ``fake_quant_enabled`` it fake-quantizes the weight (per output channel or per tensor) and, when
    ``config.activation_bits`` is set, both its input and its output: ONNX Runtime fuses DQ -> Conv -> Q into an
    integer ``QLinearConv`` only when the output is quantized. With it off, exactly ``nn.Conv1d.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU())
    >>> conv = convert_(model, QuantConfig(), ["0"])["0"]
    >>> type(conv).__name__, sorted(conv.input_quantizers), sorted(conv.weight_quantizers)
    ('QATConv1d', ['input', 'output'], ['weight'])
    >>> conv.fake_quant_enabled = True
    >>> model.train()(torch.randn(2, 1, 8)).shape  # training mode observes the activation ranges
    torch.Size([2, 4, 6])
    """


class QATConv2d(_QATConv, nn.Conv2d):
    """``nn.Conv2d`` converted for quantization-aware training (by :func:`convert_`, never constructed). With
    ``fake_quant_enabled`` it fake-quantizes the weight (per output channel or per tensor) and, when
    ``config.activation_bits`` is set, both its input and its output: ONNX Runtime fuses DQ -> Conv -> Q into an
    integer ``QLinearConv`` only when the output is quantized. With it off, exactly ``nn.Conv2d.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    >>> conv = convert_(model, QuantConfig(), ["0"])["0"]
    >>> type(conv).__name__, sorted(conv.input_quantizers), sorted(conv.weight_quantizers)
    ('QATConv2d', ['input', 'output'], ['weight'])
    >>> conv.fake_quant_enabled = True
    >>> model.train()(torch.randn(2, 1, 8, 8)).shape  # training mode observes the activation ranges
    torch.Size([2, 4, 6, 6])
    """


class QATConv3d(_QATConv, nn.Conv3d):
    """``nn.Conv3d`` converted for quantization-aware training (by :func:`convert_`, never constructed). With
    ``fake_quant_enabled`` it fake-quantizes the weight (per output channel or per tensor) and, when
    ``config.activation_bits`` is set, both its input and its output: ONNX Runtime fuses DQ -> Conv -> Q into an
    integer ``QLinearConv`` only when the output is quantized. With it off, exactly ``nn.Conv3d.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU())
    >>> conv = convert_(model, QuantConfig(), ["0"])["0"]
    >>> type(conv).__name__, sorted(conv.input_quantizers), sorted(conv.weight_quantizers)
    ('QATConv3d', ['input', 'output'], ['weight'])
    >>> conv.fake_quant_enabled = True
    >>> model.train()(torch.randn(2, 1, 5, 5, 5)).shape  # training mode observes the activation ranges
    torch.Size([2, 4, 3, 3, 3])
    """


class QATConv1D(QuantizedLayer):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): ``x @ W + b``, ``W`` stored
    ``(in_features, out_features)``. Weights are quantized per output channel along axis 1, inputs as for
    :class:`QATLinear`; exported as a MatMul (N-D inputs) that ONNX Runtime runs as ``MatMulIntegerToFloat``.
    With fake quantization off it runs the original class's own forward.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> class Conv1D(nn.Module):  # stands in for transformers.pytorch_utils.Conv1D
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
    ...     def forward(self, x):
    ...         return x @ self.weight + self.bias
    >>> Conv1D.__module__ = "transformers.pytorch_utils"
    >>> model = nn.Sequential(Conv1D(3, 4))
    >>> layer = convert_(model, QuantConfig(weight_bits=4, activation_bits=None), ["0"])["0"]
    >>> layer.fake_quant_enabled = True
    >>> ints, scale = layer.weight_quantizers["weight"].integers(layer.weight)
    >>> type(layer).__name__, tuple(ints.shape), tuple(scale.shape)  # one scale per output channel (axis 1)
    ('QATConv1D', (4, 3), (3,))
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(layer(x), x @ (ints * scale) + layer.bias)
    True
    """

    if TYPE_CHECKING:  # the attributes of transformers' Conv1D, whose class this object had
        weight: nn.Parameter
        bias: nn.Parameter | None
        nf: int

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant_enabled:
            return self.original_class.forward(self, x)
        w = self._quantize_weight("weight", self.weight)
        x = self._quantize_input("input", x)
        if self._exporting() and x.dim() > 2:  # MatMul (+ Add): MatMulIntegerToFloat in ONNX Runtime
            y = x @ w
            return y if self.bias is None else y + self.bias
        flat = x.reshape(-1, x.shape[-1])  # the original's own arithmetic (addmm), so results match it exactly
        y = flat @ w if self.bias is None else torch.addmm(self.bias, flat, w)
        return y.view(*x.shape[:-1], w.shape[1])

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.weight.shape[0]}"


HFConv1D.register(QATConv1D)  # still a Conv1D to selection (its input dimension is 0) once converted


class QATEmbedding(QuantizedLayer, nn.Embedding):
    """``nn.Embedding`` converted for quantization-aware training (by :func:`convert_`, never constructed).
    Weight-only: the inputs are indices. With ``fake_quant_enabled`` the rows looked up are fake-quantized (one
    scale per row); with it off, exactly ``nn.Embedding.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.Embedding(10, 4))
    >>> emb = convert_(model, QuantConfig(weight_bits=4), ["0"])["0"]
    >>> type(emb).__name__, sorted(emb.weight_quantizers), emb.input_quantizers
    ('QATEmbedding', ['weight'], {})
    >>> emb.fake_quant_enabled = True
    >>> ints, scale = emb.weight_quantizers["weight"].integers(emb.weight)
    >>> ids = torch.tensor([[1, 5, 5]])
    >>> torch.allclose(emb(ids), (ints * scale[:, None])[ids])
    True
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant_enabled:
            return super().forward(x)
        quantizer = self.weight_quantizers.get("weight")
        if quantizer is not None and self.padding_idx is None and self.max_norm is None and not (
                self.scale_grad_by_freq or self.sparse):  # the same lookup, quantizing only the rows it reads
            return quantizer.rows(self.weight, x)
        return F.embedding(x, self._quantize_weight("weight", self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)



_CLASSES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d,
    nn.Embedding: QATEmbedding, nn.LSTM: QATLSTM, nn.GRU: QATGRU, nn.RNN: QATRNN,
    nn.MultiheadAttention: QATMultiheadAttention,
    ATTENTION_OUT_PROJ: QATLinear,
}
QUANTIZABLE_KINDS: tuple[type[nn.Module], ...] = (
    nn.Linear, HFConv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.RNNBase, nn.MultiheadAttention,
)
"""Layer kinds :func:`convert_` handles (exact classes; a subclass with its own ``forward`` is refused)."""


def _target_class(original: type[nn.Module]) -> type[QuantizedLayer] | None:
    if original in _CLASSES:
        return _CLASSES[original]
    return QATConv1D if HFConv1D.matches(original) else None


def _output_axes(module: nn.Module) -> dict[str, int]:
    """Per weight attribute, the dimension of its output channels (where per-channel scales lie)."""
    return {attr: 1 - dim for attr, dim in weight_attributes(module)}


def _weights_of(module: nn.Module) -> list[str]:
    """All weight matrices a converted layer can fake-quantize."""
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module.in_proj_weight is not None else [
            "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [*names, "out_proj.weight"]
    if isinstance(module, nn.RNNBase):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
    return ["weight"]


def _input_keys(module: nn.Module) -> tuple[str, ...]:
    if isinstance(module, QATMultiheadAttention):
        return ("query", "key", "value", "out_proj")
    if isinstance(module, _QATConv):
        return ("input", "output")
    if isinstance(module, (QATLinear, QATConv1D)):
        return ("input",)
    return ()  # embeddings take indices; recurrent layers are weight-only


def convert_(
    model: nn.Module, config: QuantConfig, layers: Mapping[str, Sequence[str]] | Sequence[str]
) -> dict[str, QuantizedLayer]:
    """Convert layers of ``model`` in place and attach their quantizers; returns the converted layers by name.

    A weight tied between layers (one ``Parameter`` in several modules) gets one quantizer, shared by all of
    them, including layers converted earlier: every owner computes with the same fake-quantized tensor.

    Args:
        model: the model.
        config: how to quantize.
        layers: layer names, or a mapping from layer name to the weight attributes to quantize (default: all of
            the layer's weight matrices; ``"out_proj.weight"`` names an attention layer's output projection).
    """
    modules: dict[str, nn.Module] = dict(model.named_modules())
    selected: Mapping[str, Sequence[str] | None] = layers if isinstance(layers, Mapping) else dict.fromkeys(layers)
    shared: dict[int, WeightQuantizer] = {}  # tensor id -> its quantizer (tied weights: one for every owner)
    for name, module in modules.items():
        if isinstance(module, QuantizedLayer) and name not in selected:
            for key, quantizer in module.weight_quantizers.items():
                shared.setdefault(id(module.weight_tensor(key)), quantizer)
    for name in selected:  # every layer is checked before any is converted: all or nothing
        module = modules[name]
        if not isinstance(module, QuantizedLayer):
            if _target_class(type(module)) is None:
                fail("parameters", "layers of the kinds " + ", ".join(k.__name__ for k in QUANTIZABLE_KINDS),
                      f"{name} ({type(module).__name__})",
                      hint="a subclass with its own forward cannot be converted safely; add it to `exclude`")
            if isinstance(module, nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
                fail("parameters", "attention layers without add_bias_kv / add_zero_attn", name,
                      hint="add this layer to `exclude`")
    converted: dict[str, QuantizedLayer] = {}
    for name, attrs in selected.items():
        module = modules[name]
        axes = _output_axes(module)
        if not isinstance(module, QuantizedLayer):
            original = type(module)
            target = _target_class(original)
            assert target is not None  # checked above
            module.__class__ = target
            assert isinstance(module, QuantizedLayer)  # the same object, now of its quantized class
            module.original_class = original
        quantizers: dict[str, WeightQuantizer] = {}
        for attr in list(attrs) if attrs is not None else _weights_of(module):
            weight = module.weight_tensor(attr)
            if id(weight) not in shared:
                shared[id(weight)] = WeightQuantizer(config, f"{name}.{attr}", axes.get(attr, 0))
            quantizers[attr] = shared[id(weight)]
        module.weight_quantizers = quantizers
        module.input_quantizers = (
            {k: ActivationQuantizer(config, f"{name}:{k}") for k in _input_keys(module)}
            if config.activation_bits is not None else {}
        )
        module.fake_quant_enabled = False
        converted[name] = module
    return converted


def revert_(module: nn.Module) -> None:
    """Give a converted layer its original class back (its parameters are untouched)."""
    if isinstance(module, QuantizedLayer):
        plain: nn.Module = module  # the same object, typed as what it becomes
        plain.__class__ = module.original_class
        for attr in ("weight_quantizers", "input_quantizers", "fake_quant_enabled", "original_class",
                     "recompute_weights"):
            module.__dict__.pop(attr, None)
