"""Layers converted in place for quantization-aware training.

:func:`convert_` swaps a layer's class to a subclass (``nn.Linear`` -> :class:`QATLinear`, ...): the object, its
``Parameter`` objects (so optimizers stay valid) and its ``state_dict`` keys stay the same; only ``forward``
changes, to fake-quantize weights and (for Linear, Conv, Hugging Face's Conv1D and attention projections) inputs.
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

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litcompress._compat import ATTENTION_OUT_PROJ, conv_forward, rnn_forward
from litcompress._validation import fail
from litcompress.layers import HFConv1D
from litcompress.quantization._recompute import wrap_forward
from litcompress.quantization.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer
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


def _linear(x: Tensor, w: Tensor, b: Tensor | None, exporting: bool) -> Tensor:
    if not exporting or x.dim() == 2:
        # 2-D: exported as Gemm; ONNX Runtime fuses DQ -> Gemm (-> Relu) -> Q into QGemm with an integer output
        # that feeds the next layer directly (a Gemm whose output is not quantized again stays float)
        return F.linear(x, w, b)
    # N-D: exported as MatMul (+ Add), which ONNX Runtime runs as MatMulIntegerToFloat
    y = x @ w.t()
    return y if b is None else y + b


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
        return _linear(self._quantize_input("input", x), w, self.bias, self._exporting())


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
    With fake quantization off it runs the original class's own forward."""

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
    """Weight-only: the inputs are indices."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant_enabled:
            return super().forward(x)
        quantizer = self.weight_quantizers.get("weight")
        if quantizer is not None and self.padding_idx is None and self.max_norm is None and not (
                self.scale_grad_by_freq or self.sparse):  # the same lookup, quantizing only the rows it reads
            return quantizer.rows(self.weight, x)
        return F.embedding(x, self._quantize_weight("weight", self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class _QATRNN(QuantizedLayer, nn.RNNBase):
    """Weight-only: the recurrent kernel runs on fake-quantized copies of the weight matrices."""

    def forward(self, x: Any, hx: Any = None) -> Any:  # as the LSTM / GRU / RNN forward it wraps
        if not self.fake_quant_enabled:
            return super().forward(x, hx)
        weights = {k: self._quantize_weight(k, self.weight_tensor(k)) for k in self.weight_quantizers}
        return rnn_forward(self, super().forward, weights, x, hx)


class QATLSTM(_QATRNN, nn.LSTM):
    """``nn.LSTM`` converted for quantization-aware training (by :func:`convert_`, never constructed). Weight-only:
    with ``fake_quant_enabled`` the recurrent kernel runs on fake-quantized copies of every ``weight_ih_l*`` /
    ``weight_hh_l*`` matrix (biases and activations stay float); with it off, exactly ``nn.LSTM.forward``. Inputs,
    outputs and the ``(h, c)`` state are those of ``nn.LSTM``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.LSTM(4, 8))
    >>> lstm = convert_(model, QuantConfig(), ["0"])["0"]
    >>> type(lstm).__name__, sorted(lstm.weight_quantizers), lstm.input_quantizers
    ('QATLSTM', ['weight_hh_l0', 'weight_ih_l0'], {})
    >>> lstm.fake_quant_enabled = True
    >>> out, (h, c) = lstm(torch.randn(5, 2, 4))  # (L, N, H_in), as nn.LSTM
    >>> out.shape, h.shape
    (torch.Size([5, 2, 8]), torch.Size([1, 2, 8]))
    """


class QATGRU(_QATRNN, nn.GRU):
    """``nn.GRU`` converted for quantization-aware training (by :func:`convert_`, never constructed). Weight-only:
    with ``fake_quant_enabled`` the recurrent kernel runs on fake-quantized copies of its weight matrices (biases
    and activations stay float); with it off, exactly ``nn.GRU.forward``.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.Sequential(nn.GRU(4, 8, batch_first=True))
    >>> gru = convert_(model, QuantConfig(weight_bits=4), ["0"])["0"]
    >>> gru.fake_quant_enabled = True
    >>> out, h = gru(torch.randn(2, 5, 4))
    >>> type(gru).__name__, out.shape
    ('QATGRU', torch.Size([2, 5, 8]))
    """


class QATRNN(_QATRNN, nn.RNN):
    """``nn.RNN`` (Elman) converted for quantization-aware training (by :func:`convert_`, never constructed).
    Weight-only: with ``fake_quant_enabled`` the recurrent kernel runs on fake-quantized copies of its weight
    matrices; with it off, exactly ``nn.RNN.forward``. :func:`revert_` gives the layer its original class back.

    >>> import torch
    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_, revert_
    >>> model = nn.Sequential(nn.RNN(4, 8))
    >>> rnn = convert_(model, QuantConfig(), ["0"])["0"]
    >>> x = torch.randn(5, 2, 4)
    >>> rnn.fake_quant_enabled = True
    >>> type(rnn).__name__, rnn(x)[0].shape
    ('QATRNN', torch.Size([5, 2, 8]))
    >>> revert_(rnn)  # the same object, its class restored
    >>> type(model[0]).__name__
    'RNN'
    """


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class QATMultiheadAttention(QuantizedLayer, nn.MultiheadAttention):
    """Attention with fake-quantized projections: inputs and weights of the q/k/v and output projections."""

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.fake_quant_enabled:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        self_attention = key is query and value is query  # before the transpose makes three new tensors
        if not self.batch_first:  # work in (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q_in = self._quantize_input("query", query)
        k_in = q_in if self_attention else self._quantize_input("key", key)
        v_in = q_in if self_attention else self._quantize_input("value", value)
        e = self.embed_dim
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self._quantize_weight("in_proj_weight", self.in_proj_weight).split(e)
        else:
            w_q = self._quantize_weight("q_proj_weight", self.q_proj_weight)
            w_k = self._quantize_weight("k_proj_weight", self.k_proj_weight)
            w_v = self._quantize_weight("v_proj_weight", self.v_proj_weight)
        b_q, b_k, b_v = self.in_proj_bias.split(e) if self.in_proj_bias is not None else (None, None, None)
        n, tq, h = q_in.shape[0], q_in.shape[1], self.num_heads
        exporting = self._exporting()
        q = _linear(q_in, w_q, b_q, exporting).view(n, tq, h, -1).transpose(1, 2)  # (N, H, L, D)
        k = _linear(k_in, w_k, b_k, exporting).view(n, k_in.shape[1], h, -1).transpose(1, 2)  # (N, H, S, D)
        v = _linear(v_in, w_v, b_v, exporting).view(n, v_in.shape[1], h, -1).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (N * H, L, S)
            mask = mask.view(n, h, tq, -1)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if is_causal and mask is None:
                causal = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = out.transpose(1, 2).reshape(n, tq, e)
        w_o = self._quantize_weight("out_proj.weight", self.out_proj.weight)
        out = _linear(self._quantize_input("out_proj", out), w_o, self.out_proj.bias, exporting)
        return (out if self.batch_first else out.transpose(0, 1)), weights


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
