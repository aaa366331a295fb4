"""One rule for calling a model on an input and one for finding the tensor in what it returns, shared by every
package (tracing, distillation, export, the report).

An input is a tensor (one positional argument), a tuple or list (positional arguments) or a mapping (keyword
arguments, as Hugging Face models take them). An output's tensor is the output itself, its ``logits`` (a Hugging
Face ``ModelOutput`` or a dict), or else its first tensor (a tuple such as an LSTM's ``(output, state)``).

>>> import torch
>>> as_call(torch.zeros(2)), as_call({"input_ids": 1})
(((tensor([0., 0.]),), {}), ((), {'input_ids': 1}))
>>> first_tensor((torch.ones(1), None)), first_tensor({"loss": torch.zeros(()), "logits": torch.ones(1)})
(tensor([1.]), tensor([1.]))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from litcompress._validation import fail

__all__: list[str] = []


def as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``inputs``: a mapping as keywords, a tuple or list as positional arguments, anything
    else as one positional argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def batch_call(example_input: Any) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` that call a model on ``example_input`` (the rule of :func:`as_call`),
    checked to be tensors whose first dimension is the batch.

    >>> import torch
    >>> batch_call(torch.zeros(2, 3))[0][0].shape, batch_call({"input_ids": torch.zeros(2, 3)})[1].keys()
    (torch.Size([2, 3]), dict_keys(['input_ids']))
    """
    args, kwargs = as_call(example_input)
    values = [*args, *kwargs.values()]
    if values and all(isinstance(v, Tensor) and v.dim() > 0 for v in values):
        return args, kwargs
    fail("example_input", "a tensor whose first dimension is the batch, a tuple of such tensors (positional inputs) "
         "or a mapping of names to such tensors (keyword inputs)", type(example_input).__name__, exc=TypeError)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` called on ``inputs`` by :func:`as_call`'s rule."""
    args, kwargs = as_call(inputs)
    return model(*args, **kwargs)


def logits_of(output: Any) -> Tensor | None:
    """``output`` itself when it is a tensor, else its ``logits`` attribute or key when that is a tensor."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def first_tensor(output: Any) -> Tensor | None:
    """:func:`logits_of` ``output``, else the first tensor among its values (a mapping) or items (a tuple or list)."""
    logits = logits_of(output)
    if logits is not None:
        return logits
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)
