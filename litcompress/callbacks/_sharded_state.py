"""Callback state that lives on FSDP2 shards (masks, scores): saved and restored through Lightning's checkpoints.

A callback's state is written by rank zero alone into the checkpoint's metadata, so a ``DTensor`` left there
would keep rank zero's rows only. Before the checkpoint is written, every ``DTensor`` of a litcompress
callback's state goes where the model's own shards go:

- a distributed checkpoint (``ModelParallelStrategy(save_distributed_checkpoint=True)``, the default): into the
  checkpoint's ``state_dict`` under ``litcompress/<state key>/<path>``, so ``torch.distributed.checkpoint``
  writes each process's shard next to the weights; the callback state keeps a small reference. On resume the
  references are read back with ``torch.distributed.checkpoint.load`` into this run's layout (another number of
  processes works too);
- a full checkpoint (``save_distributed_checkpoint=False``): gathered to whole tensors, like the weights; a
  sharded fit resumed from it takes its rows, and so does any unsharded use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from os import PathLike
from typing import Any

import torch
from torch import nn

from litcompress._shards import is_dtensor
from litcompress._validation import fail

__all__: list[str] = []

_MARK = "__litcompress_shards__"
_PREFIX = "litcompress/"


def _walk(value: Any, fn: Callable[[Any, str], Any], path: str = "") -> Any:
    """``value`` with every leaf replaced by ``fn(leaf, path)`` (dicts are walked; a reference is a leaf)."""
    if isinstance(value, Mapping) and _MARK not in value:
        return {k: _walk(v, fn, f"{path}/{k}" if path else str(k)) for k, v in value.items()}
    return fn(value, path)


def save_sharded(state_key: str, state: Any, checkpoint: dict[str, Any]) -> Any:
    """``state`` ready for rank zero to write (see the module docstring); collective: call it on every process."""
    model_state = checkpoint.get("state_dict", {})
    distributed = any(is_dtensor(v) for v in model_state.values())

    def out(value: Any, path: str) -> Any:
        if not is_dtensor(value):
            return value
        if not distributed:
            return value.full_tensor()
        key = f"{_PREFIX}{state_key}/{path}"
        model_state[key] = value
        return {_MARK: key, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}

    return _walk(state, out)


def _has_references(state: Any) -> bool:
    found = []
    _walk(state, lambda v, _: found.append(v) if isinstance(v, Mapping) else None)
    return bool(found)


def load_sharded(state: Any, path: str | PathLike[str] | None, model: nn.Module | None) -> Any:
    """``state`` with every reference written by :func:`save_sharded` read back from the checkpoint at ``path``,
    laid out over the device mesh of ``model``'s sharded parameters. Collective: call it on every process."""
    if not _has_references(state):
        return state
    params = model.parameters() if model is not None else iter(())
    mesh = next((p.device_mesh for p in params if is_dtensor(p)), None)
    if path is None or mesh is None:
        fail("checkpoint", "a distributed checkpoint loaded into a model sharded with FSDP2",
             f"sharded callback state with checkpoint path {path!r}",
             hint="this callback state was saved by a sharded fit: resume it with `fit(ckpt_path=...)` under "
                  "ModelParallelStrategy, or save full checkpoints (save_distributed_checkpoint=False)")
    from torch.distributed.checkpoint import load
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import empty as dtensor_empty

    wanted: dict[str, Any] = {}

    def template(value: Any, _: str) -> Any:
        if isinstance(value, Mapping):
            t = dtensor_empty(*value["shape"], dtype=getattr(torch, value["dtype"]), device_mesh=mesh,
                              placements=[Shard(0)])
            wanted[value[_MARK]] = t
            return t
        return value

    restored = _walk(state, template)
    load({"state_dict": wanted}, checkpoint_id=str(path))
    return restored
