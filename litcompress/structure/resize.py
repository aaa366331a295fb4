"""A model reshaped to the structure a ``state_dict`` was saved from (channels removed, layers factorized).

A model whose structure changed during training (:class:`~litcompress.callbacks.Pruning` removing channels,
:class:`~litcompress.callbacks.LowRankFactorization`) saves weights its own class, built fresh, cannot load.
:func:`match_structure_` reshapes a freshly built model to the saved shapes first; ``load_state_dict`` then fills
in the weights. It needs no tracing and no input: the shapes in the ``state_dict`` say everything.

- a layer saved factorized (``<layer>.first.weight`` and ``<layer>.second.weight``) becomes a
  :class:`~litcompress.factorization.Factorized` of the saved rank;
- an attention layer saved with heads removed (``<layer>.kept_heads``) becomes a
  :class:`~litcompress.sparsity.heads.PrunedMultiheadAttention` with that many heads;
- every other tensor whose saved shape differs is resized, and its layer's size attributes follow
  (``in_features``/``out_features``, ``in_channels``/``out_channels``, BatchNorm's ``num_features``, LayerNorm's
  ``normalized_shape``, ``Embedding``'s sizes, transformers' ``Conv1D`` ``nf``/``nx``).

A resized tensor of a layer kind not listed is an error naming the key, never a silent half-resized model.

>>> import torch
>>> from torch import nn
>>> saved = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict()
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
>>> match_structure_(model, saved)
['0', '2']
>>> _ = model.load_state_dict(saved)
>>> model[0].out_features, model[2].in_features
(3, 3)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from litcompress._validation import fail
from litcompress.factorization.lowrank import Factorized, factorizable
from litcompress.layers import sync_sizes
from litcompress.sparsity.heads import PrunedMultiheadAttention, remove_heads
from litcompress.sparsity.hf_heads import find_attention

_ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)

__all__ = ["match_structure_"]


def match_structure_(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """Reshape ``model`` in place so that ``state_dict`` (keys under ``prefix``) loads into it.

    Args:
        model: the freshly built model, changed in place.
        state_dict: the saved tensors (only their shapes and keys are read).
        prefix: what the saved keys put before the model's own names (``"model."`` for a LightningModule holding
            the model as ``self.model``).

    Returns:
        The names of the layers changed (factorized or resized), in module order.
    """
    changed: list[str] = []
    for name, module in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        first, second = state_dict.get(f"{key}first.weight"), state_dict.get(f"{key}second.weight")
        if first is not None and second is not None and not isinstance(module, Factorized):
            if factorizable(module) is not None:
                fail("state_dict", "weights saved from this model's structure", f"{key}first.weight",
                     hint=f"the layer `{name}` was saved factorized, but {factorizable(module)}")
            model.set_submodule(name, Factorized.like(module, first.shape[0]))
            changed.append(name)
        kept = state_dict.get(f"{key}kept_heads")
        if kept is not None and isinstance(module, _ATTENTION) and (
                not isinstance(module, PrunedMultiheadAttention) or module.kept_heads.shape != kept.shape):
            keep = torch.zeros(module.num_heads, dtype=torch.bool)  # an attention layer saved with heads removed
            keep[: kept.numel()] = True  # which ones does not matter: the weights and `kept_heads` are loaded next
            model.set_submodule(name, remove_heads(module, keep))
            changed.append(name)
    for name, module in model.named_modules():
        key = f"{prefix}{name}." if name else prefix
        own = [(n, t, n in module._parameters) for n, t in (*module.named_parameters(recurse=False),
                                                            *module.named_buffers(recurse=False))]
        resized = False
        for attr, tensor, is_param in own:
            saved = state_dict.get(key + attr)
            if saved is None or saved.shape == tensor.shape:
                continue
            new = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            if is_param:
                setattr(module, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                module._buffers[attr] = new
            resized = True
        if resized:
            if not sync_sizes(module):
                fail("state_dict", "weights whose shapes this model's layers can take", f"{key}{own[0][0]}",
                     hint=f"its layer is a {type(module).__name__}, which cannot be resized: build the model with the "
                          "saved sizes, or save it whole with torch.save")
            if name not in changed:
                changed.append(name)
    if changed:
        for block in find_attention(model).values():
            block.refresh()  # HF head counters follow the resized projections (GPT-2 splits by one)
    return changed
