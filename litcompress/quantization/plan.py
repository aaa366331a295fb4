"""`conversion_plan`: which layers, and which of their weights, quantization-aware training converts for a selection
of weight tensors.

A selection names tensors; conversion works on layers. Two mappings sit between them:

- a weight tied between layers (an embedding and its language-model head) is quantized in every layer holding it,
  by one quantizer, so the tied copies stay one tensor;
- the output projection of ``nn.MultiheadAttention`` (``<attn>.out_proj.weight``) is converted through its
  attention layer, which runs the projection itself (as ``out_proj.weight``).

A selected weight held by a layer of a kind that cannot be converted is an error naming it (with the tensor it is
tied to): it would otherwise train in float in one place and quantized in another.

>>> from torch import nn
>>> from litcompress.selection import select_parameters
>>> model = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2))
>>> conversion_plan(model, select_parameters(model))
{'0': ['weight'], '1': ['in_proj_weight', 'out_proj.weight']}
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from litcompress._validation import fail
from litcompress.quantization.layers import QUANTIZABLE_KINDS
from litcompress.selection import ParameterRef

__all__ = ["conversion_plan"]


def conversion_plan(model: nn.Module, refs: Sequence[ParameterRef]) -> dict[str, list[str]]:
    """The layers of ``model`` to convert and, for each, the weights its quantizers cover.

    Args:
        model: the model the references point into.
        refs: the selected weight tensors (:func:`~litcompress.selection.select_parameters`), each with the other
            layers that hold it (``owners``).

    Returns:
        Layer name -> the names of its weights to quantize, in selection order.

    Raises:
        ValueError: a selected weight (or a layer it is tied into) is not a layer kind quantization can convert.
    """
    modules: dict[str, nn.Module] = dict(model.named_modules())
    attention = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    layers: dict[str, list[str]] = {}
    for ref in refs:
        for alias in ref.owners:  # a tied weight is quantized in every layer that holds it, by one quantizer
            owner, attr = alias.module_name, alias.attr
            parent = owner.rpartition(".")[0] if "." in owner else ""
            if owner.endswith("out_proj") and (parent in attention):
                owner, attr = parent, "out_proj.weight"  # attention runs its output projection itself
            if not isinstance(modules[owner], QUANTIZABLE_KINDS):
                tied = f" (tied to `{ref.name}`, which would train quantized elsewhere)" if alias is not ref else ""
                fail("parameters", "weights of " + ", ".join(k.__name__ for k in QUANTIZABLE_KINDS),
                     alias.name + tied, hint="quantization-aware training converts whole layers of these kinds; "
                     "`exclude` the weight to keep it in float")
            if attr not in layers.setdefault(owner, []):
                layers[owner].append(attr)
    return layers
