"""Every use of a private torch internal, in one place, each with a test (``tests/test_compat.py``).

litcompress uses public torch APIs wherever one exists in the supported range (``torch>=2.4,<3``). What is left
here has no public equivalent; if a torch upgrade breaks one of them, it breaks in this file and in its test,
not somewhere inside a callback. Each function says why it is needed and what it falls back to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "ATTENTION_OUT_PROJ",
    "ConvLayer",
    "conv_forward",
    "eager_calls",
    "foreach_abs_",
    "foreach_add_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_sub_",
    "qdq_ops",
    "rnn_forward",
    "without_fsdp",
]


def qdq_ops() -> Any:
    """``torch.ops.quantized_decomposed``: the Q/DQ ops that the ONNX exporter turns into QuantizeLinear /
    DequantizeLinear. They are registered by importing a private torch module; no public module registers them.
    """
    import torch.ao.quantization.fx._decomposed

    return torch.ops.quantized_decomposed


ATTENTION_OUT_PROJ: type[nn.Module] = type(nn.MultiheadAttention(2, 1).out_proj)
"""The class of ``nn.MultiheadAttention.out_proj`` (a ``Linear`` subclass torch does not export publicly)."""


class ConvLayer(Protocol):
    """What :func:`conv_forward` uses of an ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (or a class extending one)."""

    bias: Tensor | None

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...


def conv_forward(module: ConvLayer, x: Tensor, weight: Tensor) -> Tensor:
    """Run a ``ConvNd`` layer with ``weight`` in place of its own, honouring every ``padding_mode``.

    ``F.conv*d`` would do for ``padding_mode="zeros"`` but not for reflect/replicate/circular padding, whose
    padding amounts are a private attribute; ``torch.func.functional_call`` would run the layer's forward hooks
    twice. The layer's own ``_conv_forward`` does exactly what its ``forward`` does.
    """
    return module._conv_forward(x, weight, module.bias)


def rnn_forward(module: nn.RNNBase, forward: Callable[..., Any], weights: dict[str, Tensor], *args: Any) -> Any:
    """Run a recurrent layer's ``forward`` with some weight matrices replaced (for fake quantization).

    The fused recurrent kernels read the list ``_flat_weights``; it is swapped for the duration of the call (no
    public API substitutes weights without running the layer's hooks twice).
    """
    saved = module._flat_weights
    module._flat_weights = [weights.get(n, w) for n, w in zip(module._flat_weights_names, saved)]
    try:
        return forward(*args)
    finally:
        module._flat_weights = saved


@contextlib.contextmanager
def eager_calls(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model`` and its submodules run their plain forward, not the one ``torch.compile`` made.

    For FLOP counting: TorchDynamo does not compile a frame entered while a ``TorchDispatchMode`` (such as
    ``FlopCounterMode``) is active, and marks its code object never to be compiled again, so a compiled model
    whose first call is counted would run eagerly for the rest of the process (and every instance of its class
    with it). What ``torch.compile`` returns keeps the function it compiles in the private attribute
    ``_torchdynamo_orig_callable``; a module holds one as ``_compiled_call_impl`` (``Module.compile()``) or as its
    ``forward`` (``torch.compile(module)``'s ``OptimizedModule``, or ``module.forward = torch.compile(...)``).
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in model.modules():
            for attr in ("_compiled_call_impl", "forward"):
                compiled = module.__dict__.get(attr)
                original = getattr(compiled, "_torchdynamo_orig_callable", None)
                if original is not None:
                    saved.append((module, attr, compiled))
                    setattr(module, attr, original)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _foreach(name: str, fallback: Callable[..., Any], *lists: Sequence[Tensor]) -> Any:
    """``torch._foreach_<name>`` on the lists (one fused kernel per device and dtype), or ``fallback`` on each
    tuple of elements when a torch release no longer has it."""
    fn = getattr(torch, f"_foreach_{name}", None)
    if fn is not None:
        return fn(*(list(x) for x in lists))
    return [fallback(*items) for items in zip(*lists)]


def foreach_mul_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``t *= o`` for each pair (``torch._foreach_mul_``)."""
    _foreach("mul_", Tensor.mul_, tensors, others)


def foreach_mul(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> list[Tensor]:
    """``t * o`` for each pair (``torch._foreach_mul``)."""
    return list(_foreach("mul", torch.mul, tensors, others))


def foreach_add_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``t += o`` for each pair (``torch._foreach_add_``)."""
    _foreach("add_", Tensor.add_, tensors, others)


def foreach_sub_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``t -= o`` for each pair (``torch._foreach_sub_``)."""
    _foreach("sub_", Tensor.sub_, tensors, others)


def foreach_abs_(tensors: Sequence[Tensor]) -> None:
    """``t = |t|`` in place for each tensor (``torch._foreach_abs_``)."""
    _foreach("abs_", Tensor.abs_, tensors)


def foreach_norm(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor (``torch._foreach_norm``)."""
    return list(_foreach("norm", torch.linalg.vector_norm, tensors))


_FSDP_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_FSDP_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_FSDP_STATE = ("__composable_api_state_key", "_fsdp", "_is_fsdp_managed_module")


def _fsdp_hook(hook: Any) -> bool:
    for obj in (hook, getattr(hook, "__self__", None), getattr(hook, "func", None)):
        if obj is not None and str(getattr(obj, "__module__", None) or type(obj).__module__).startswith(
                "torch.distributed"):
            return True
    return False


def without_fsdp(module: nn.Module) -> tuple[type, dict[str, Any]]:
    """The class ``module`` had before ``fully_shard`` and its attributes without FSDP2's: the pieces of a plain copy.

    FSDP2 (``torch.distributed.fsdp.fully_shard``) swaps a module's class for a generated subclass of
    ``FSDPModule``, keeps its state under private attribute names (``__composable_api_state_key_*``, ``_fsdp_*``,
    ``_is_fsdp_managed_module``) and registers forward / backward hooks bound to its state objects. It offers no
    public way back (``copy.deepcopy`` refuses: "use state dict"), so
    :func:`~litcompress.distributed.gather_model` rebuilds the module tree from these pieces. Hook dictionaries
    are copied without FSDP's hooks.
    """
    from collections import OrderedDict

    from torch.distributed.fsdp import FSDPModule

    cls: type = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))
    attrs = {k: v for k, v in module.__dict__.items() if not k.startswith(_FSDP_STATE)}
    for name in _FSDP_HOOKS:
        if name in attrs:
            attrs[name] = OrderedDict((k, h) for k, h in attrs[name].items() if not _fsdp_hook(h))
    kept = set().union(*(attrs[h].keys() for h in ("_forward_pre_hooks", "_forward_hooks") if h in attrs))
    for name in _FSDP_HOOK_FLAGS:
        if name in attrs:
            attrs[name] = type(attrs[name])((k, v) for k, v in attrs[name].items() if k in kept)
    return cls, attrs
