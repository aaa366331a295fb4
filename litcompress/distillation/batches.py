"""Batches and model outputs in pure torch: tuples or dicts in, tensors or ``ModelOutput`` objects out.

A batch is ``(inputs, targets)``, ``(inputs,)``, bare inputs, or a dict of keyword arguments (a Hugging Face
batch: ``{"input_ids", "attention_mask", "labels", ...}``) whose ``labels`` are the targets. Dict inputs are
passed to a model as keyword arguments. Outputs are logit tensors, or objects carrying them (a ``logits``
attribute or key: Hugging Face's ``ModelOutput``; detected without importing transformers).

>>> import torch
>>> from torch import nn
>>> inputs, labels = split_batch({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])})
>>> sorted(inputs), labels
(['input_ids'], tensor([[1, 2, 3]]))
>>> output_logits({"logits": torch.zeros(1, 2)})
tensor([[0., 0.]])
>>> aligned_targets(torch.zeros(1, 3, 5), labels, shift=True)  # causal LM: logits at t predict label t + 1
tensor([[   2,    3, -100]])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._calls import logits_of
from litcompress._validation import fail_state

__all__ = [
    "LABELS",
    "accepts_keyword",
    "aligned_targets",
    "is_causal_lm",
    "mix_inputs",
    "output_logits",
    "output_loss",
    "position_mask",
    "split_batch",
    "targets_and_mask",
]

LABELS = "labels"
"""The key of a dict batch's targets (Hugging Face's name); every other key is an input."""


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch; ``targets`` is ``None`` for unlabeled batches.

    A dict's inputs are a new dict without its ``labels`` (what a teacher is given); a tuple or list gives its first
    two items; anything else is the inputs.

    >>> split_batch((torch.zeros(2), torch.ones(2)))
    (tensor([0., 0.]), tensor([1., 1.]))
    >>> split_batch({"x": 1})
    ({'x': 1}, None)
    """
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != LABELS}, batch.get(LABELS)
    if isinstance(batch, (tuple, list)):
        return (batch[0], batch[1]) if len(batch) > 1 else (batch[0], None)
    return batch, None


def output_logits(output: Any) -> Tensor:
    """The logits of a model's output: the tensor itself, its ``logits`` attribute, or its ``"logits"`` key.

    >>> from types import SimpleNamespace
    >>> output_logits(SimpleNamespace(loss=None, logits=torch.ones(1, 2)))  # e.g. a Hugging Face ModelOutput
    tensor([[1., 1.]])
    """
    logits = logits_of(output)
    if logits is None:
        fail_state(f"the model returned a {type(output).__name__}, which is not a tensor and has no `logits` tensor",
                   "DistillationModule.logits", "return logits (or an object with a `logits` tensor), or override "
                   "`DistillationModule.logits(output)` to pick them from what your model returns", exc=TypeError)
    return logits


def output_loss(output: Any) -> Tensor | None:
    """The loss a model computed itself (a ``loss`` attribute or key holding a tensor), else ``None``.

    >>> output_loss({"loss": torch.tensor(2.0), "logits": torch.zeros(1)}), output_loss(torch.zeros(1))
    (tensor(2.), None)
    """
    if isinstance(output, Tensor):
        return None
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def accepts_keyword(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s ``forward`` takes a keyword argument ``name`` (named, or through ``**kwargs``).

    >>> accepts_keyword(nn.Linear(1, 1), "labels")
    False
    """
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume not
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (by class name: ``...ForCausalLM``,
    ``...LMHeadModel``), whose own loss compares the logits at position ``t`` with the label at ``t + 1``.

    >>> is_causal_lm(nn.Linear(1, 1))
    False
    """
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def aligned_targets(logits: Tensor, targets: Tensor, shift: bool, ignore_index: int = -100) -> Tensor:
    """The targets position by position with ``logits``: with ``shift`` and token logits ``(B, T, V)`` and
    labels ``(B, T)``, the label of position ``t`` is ``targets[:, t + 1]`` and the last position gets
    ``ignore_index`` (the comparison Hugging Face's causal LM loss makes); otherwise the targets as they are.

    Args:
        logits: the model's logits (token logits ``(B, T, V)`` to shift).
        targets: the batch's targets (labels ``(B, T)`` to shift).
        shift: shift token labels by one position (a causal language model's batch); ``False`` returns ``targets``.
        ignore_index: the label of the last position after a shift (ignored by the losses).
    """
    if not (shift and logits.dim() == 3 and targets.dim() == 2 and targets.shape == logits.shape[:2]):
        return targets
    return torch.cat([targets[:, 1:], targets.new_full((targets.shape[0], 1), ignore_index)], dim=1)


def targets_and_mask(logits: Tensor, targets: Any, inputs: Any, shift: bool = False,
                     ignore_index: int = -100) -> tuple[Any, Tensor | None]:
    """:func:`aligned_targets` (``shift`` for dict inputs only: tuple batches' targets are aligned already) and
    :func:`position_mask` (with a dict's ``attention_mask``) of a batch.

    Args:
        logits: the model's logits.
        targets: the batch's targets; anything but a tensor (e.g. ``None``) is returned as it is.
        inputs: the batch's inputs; a dict's ``attention_mask`` (if any) masks positions, and only dict inputs are
            shifted.
        shift: shift a dict batch's token labels by one position (a causal language model's batch).
        ignore_index: the target value of positions that do not count (and of the last position after a shift).

    >>> targets_and_mask(torch.zeros(1, 3, 4), torch.tensor([[5, 6, 7]]), {"attention_mask": torch.tensor([[1, 1, 0]])},
    ...                  shift=True)
    (tensor([[   6,    7, -100]]), tensor([[ True,  True, False]]))
    """
    dict_inputs = isinstance(inputs, Mapping)
    if isinstance(targets, Tensor):
        targets = aligned_targets(logits, targets, shift and dict_inputs, ignore_index)
    attention = inputs.get("attention_mask") if dict_inputs else None
    return targets, position_mask(logits, targets, attention, ignore_index)


def position_mask(logits: Tensor, targets: Tensor | None, attention_mask: Any = None,
                  ignore_index: int = -100) -> Tensor | None:
    """The positions of token logits ``(B, T, V)`` that count: targets (aligned with the logits) other than
    ``ignore_index``, where the ``attention_mask`` is not 0; ``None`` when every position counts.

    Args:
        logits: the model's logits; fewer than 3 dimensions (no token positions) gives ``None``.
        targets: targets aligned with the logits ``(B, T)``, or ``None``; a tensor of another shape is not used.
        attention_mask: a ``(B, T)`` tensor, 0 at padding; anything else (default ``None``) is not used.
        ignore_index: the target value of positions that do not count.

    >>> position_mask(torch.zeros(1, 3, 4), torch.tensor([[5, -100, 6]]), torch.tensor([[1, 1, 0]]))
    tensor([[ True, False, False]])
    """
    if logits.dim() < 3:
        return None
    mask: Tensor | None = None
    if isinstance(targets, Tensor) and targets.shape == logits.shape[:-1]:
        mask = targets != ignore_index
    if isinstance(attention_mask, Tensor) and attention_mask.shape == logits.shape[:-1]:
        mask = attention_mask != 0 if mask is None else mask & (attention_mask != 0)
    return mask


def mix_inputs(inputs: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """``size`` convex mixes of two random rows of ``inputs`` (the draws from ``generator``).

    Args:
        inputs: a floating-point batch ``(B, ...)``; the mixes keep its device and dtype.
        size: how many mixes to make (rows of the result).
        generator: a CPU generator for the row pairs and the mixing weights (uniform in ``[0, 1)``, one per mix).

    >>> mixed = mix_inputs(torch.tensor([[0.0], [1.0]]), 3, torch.Generator().manual_seed(0))
    >>> mixed.shape, bool(((mixed >= 0) & (mixed <= 1)).all())
    (torch.Size([3, 1]), True)
    """
    n = inputs.shape[0]
    a, b = torch.randint(n, (size,), generator=generator), torch.randint(n, (size,), generator=generator)
    lam = torch.rand((size,) + (1,) * (inputs.dim() - 1), generator=generator).to(inputs.device, inputs.dtype)
    return lam * inputs[a.to(inputs.device)] + (1 - lam) * inputs[b.to(inputs.device)]
