"""`gather_model`: a whole, plain copy of an FSDP2-sharded model on one process, for export and reports.

A model sharded with ``torch.distributed.fsdp.fully_shard`` holds ``DTensor`` shards and runs collectives in its
forward, so it cannot be exported, saved as one file or timed by one process. :func:`gather_model` gathers its
weights (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict=True``) onto one
process, into a copy of the same module tree (the same classes, including quantization-aware layers, without
FSDP's hooks). Memory: the whole model once, on the CPU of the receiving process; the others receive nothing.

:func:`~litcompress.export.export_onnx`, :func:`~litcompress.quantization.save_compressed` and
:class:`~litcompress.callbacks.CompressionReport` call it themselves when given a sharded model: like every
collective, such a call must be made on every process (rank zero writes, the others return).

>>> from torch import nn
>>> model = nn.Linear(4, 2)
>>> gather_model(model) is model  # not sharded: nothing to gather
True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from litcompress._compat import without_fsdp
from litcompress._shards import is_dtensor
from litcompress._validation import fail

__all__ = ["check_synced", "gather_model", "is_sharded_model"]

def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 or tensor parallel)."""
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    return any(is_dtensor(p) for p in model.parameters())


def check_synced(model: nn.Module) -> None:
    """Refuse a model sharded with FSDP2 in which some trainable parameters were left out of ``fully_shard``.

    FSDP2 averages the gradients of the parameters it manages (``DTensor``s) and of nothing else: a plain trainable
    tensor next to them (a head, an adapter, an embedding left unwrapped) trains on each process's own samples and
    silently drifts apart between processes.

    Raises:
        ValueError: naming the unwrapped parameters.
    """
    if not is_sharded_model(model):
        return
    named = list(model.named_parameters())
    plain = [n for n, p in named if p.requires_grad and not is_dtensor(p)]
    if plain:
        fail("model", "every trainable parameter under fully_shard in a model sharded with FSDP2",
             f"{len(plain)} plain: " + ", ".join(plain[:6]) + (", ..." if len(plain) > 6 else ""),
             hint="FSDP2 averages the gradients of the parameters it shards only: the others would train apart on "
                  "each process. Apply fully_shard to the modules holding them (or to the whole LightningModule) "
                  "in configure_model")


def gather_model(model: nn.Module) -> nn.Module | None:
    """A plain copy of the sharded ``model`` with whole weights (on the CPU) on rank zero; ``None`` on the
    others. An unsharded ``model`` is returned as it is. Collective: call it on every process.

    The copy shares everything but its parameters and FSDP's state with ``model`` (quantizer objects, non-tensor
    attributes): use it for export, files and reports, not for further training.
    """
    if not is_sharded_model(model):
        return model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: the whole tensors are materialised on rank 0 only, one at a time
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return _plain(model, state, "", {})


def _plain(module: nn.Module, state: dict[str, Any], prefix: str, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls, attrs = without_fsdp(module)
    copy: nn.Module = object.__new__(cls)  # nn.Module defines no __new__; __init__ is not run
    memo[id(module)] = copy
    params: dict[str, nn.Parameter | None] = {}
    for name, p in module._parameters.items():
        if p is None or id(p) in memo:
            params[name] = None if p is None else memo[id(p)]
            continue
        value = state.get(prefix + name)
        if value is None:
            if is_dtensor(p):
                fail("model", "a model whose state dict names every sharded parameter", prefix + name,
                     hint="gather_model rebuilds the module tree from the full state dict")
            value = p
        memo[id(p)] = params[name] = nn.Parameter(value.detach().cpu(), requires_grad=p.requires_grad)
    attrs["_parameters"] = params
    attrs["_buffers"] = {name: None if b is None else state.get(prefix + name, b).cpu()
                         for name, b in module._buffers.items()}
    attrs["_modules"] = {name: (_plain(child, state, f"{prefix}{name}.", memo) if child is not None else None)
                         for name, child in module._modules.items()}
    copy.__dict__.update(attrs)
    return copy
