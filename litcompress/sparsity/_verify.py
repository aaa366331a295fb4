"""Checking a removal before trusting it (private: for ``channels.py`` and the callbacks that remove channels).

A dependency graph is traced on one input and can be wrong about a layout it does not understand: a layer whose
output is split and recombined (a gated ``chunk(2)``), reshaped before the next layer reads it, or a branch the
tracing input did not take. Removing channels from such a model can delete more than the masks hold, or leave a
model that fails (or computes something else) on other inputs. So a removal is checked three ways, and any
difference is reported as text (``None``: the removal is exact):

- shapes: every tensor keeps exactly the positions its masks keep (:meth:`ChannelPruner.kept_positions`);
- ties: tensors shared by several layers before the removal (tied weights) are still shared after it;
- outputs: on every checked input the smaller model computes what the masked model computed, within float
  tolerance.

:func:`dry_run` checks every group of a new pruner this way on a copy of the model, with about half of its channels
masked, before any mask is set; :func:`try_removal` checks the pruner's own masks on more inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._calls import call_model, first_tensor

__all__: list[str] = []

_Kept = Mapping[tuple[nn.Module, str], Mapping[int, Tensor]]


def throwaway_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to try a removal on (a LightningModule's copy drops its Trainer)."""
    return copy.deepcopy(model)


def outputs(model: nn.Module, inputs: Sequence[Any]) -> list[Tensor]:
    """The output tensor of ``model`` on each of ``inputs`` (eval mode, no gradients; the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = []
            for x in inputs:
                y = first_tensor(call_model(model, x))
                if y is None:
                    raise TypeError("the model returned no tensor")
                out.append(y.detach())
            return out
    finally:
        model.train(was_training)


def mismatch(before: Sequence[Tensor], after: Sequence[Tensor]) -> str | None:
    """How ``after`` differs from ``before`` beyond float tolerance (``None``: it does not)."""
    for i, (a, b) in enumerate(zip(before, after)):
        if a.shape != b.shape:
            return f"on input {i} the smaller model's output has shape {tuple(b.shape)}, not {tuple(a.shape)}"
        tol = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2
        a32, b32 = a.float(), b.float().to(a.device)
        scale = max(float(a32.abs().max()) if a32.numel() else 0.0, 1.0)
        diff = float((a32 - b32).abs().max()) if a32.numel() else 0.0
        if not diff <= tol * scale:  # also catches NaN
            return (f"on input {i} the smaller model's output differs from the masked model's by {diff:.3g} "
                    f"(largest |output| {scale:.3g})")
    return None


def _ties(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every tensor held by more than one (module, attribute) of ``model``: its holders."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((m, attr))
    return [h for h in holders.values() if len(h) > 1]


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(tensor): names}`` for every parameter that more than one layer of ``model`` holds (tied weights)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return {k: v for k, v in out.items() if len(v) > 1}


def check_removal(model: nn.Module, inputs: Sequence[Any], kept: _Kept, replaced: Mapping[nn.Module, nn.Module],
                  remove: Callable[[], Any]) -> str | None:
    """Run ``remove()`` on ``model`` (in place: pass a copy) and check it (see the module's docstring): ``kept`` is
    what :meth:`ChannelPruner.kept_positions` said before the removal, ``replaced`` the pruner's replaced layers."""
    names = {m: n for n, m in model.named_modules()}
    try:
        before = outputs(model, inputs)
    except Exception as err:
        return f"the masked model fails on the checked inputs ({type(err).__name__}: {err})"
    ties = _ties(model)
    try:
        remove()
    except Exception as err:
        return f"the removal fails ({type(err).__name__}: {err})"
    for (module, attr), dims in kept.items():
        if module in replaced:
            continue  # an attention layer replaced by a smaller one: its outputs are checked below
        shape = getattr(module, attr).shape
        for dim, keep in dims.items():
            if shape[dim] != keep.numel():
                return (f"the removal leaves `{names.get(module, type(module).__name__)}.{attr}` with "
                        f"{shape[dim]} positions along dimension {dim} where the masks keep {keep.numel()}: the "
                        "dependency graph couples these channels differently from the masks (a layer whose "
                        "output is split and recombined, such as a gated `chunk(2)`?)")
    for holders in ties:
        if len({id(getattr(m, a)) for m, a in holders}) > 1:
            return ("the removal unties the weights shared by "
                    + ", ".join(f"`{names.get(m, type(m).__name__)}.{a}`" for m, a in holders))
    try:
        after = outputs(model, inputs)
    except Exception as err:
        return f"the smaller model fails on the checked inputs ({type(err).__name__}: {err})"
    return mismatch(before, after)


def dry_run(pruner: Any) -> dict[str, str]:
    """Remove about half of every group's channels of ``pruner`` (a fresh
    :class:`~litcompress.sparsity.channels.ChannelPruner`) from a copy of its model: the groups whose removal is not
    exact are dropped from ``pruner.groups`` (each group is tried alone to find them); returns ``{group: why}``."""
    masks = {g.name: _test_mask(g.channels) for g in pruner.groups}
    if try_removal(pruner, masks, []) is None:
        return {}
    bad = {g.name: w for g in pruner.groups if (w := try_removal(pruner, {g.name: masks[g.name]}, [])) is not None}
    pruner.groups = [g for g in pruner.groups if g.name not in bad]
    if pruner.groups and (still := try_removal(pruner, {g.name: masks[g.name] for g in pruner.groups}, [])):
        bad |= {g.name: still for g in pruner.groups}  # exact one by one, not together: none is removed
        pruner.groups = []
    return {name: f"removing its channels is not exact: {why}" for name, why in bad.items()}


def try_removal(pruner: Any, masks: Mapping[str, Tensor], inputs: Sequence[Any]) -> str | None:
    """Remove the ``masks``' channels (``{group: kept}``) from a copy of ``pruner``'s model, traced again on the
    pruner's traced input, and check the copy on that input and on ``inputs`` (:func:`check_removal`); ``None``
    when the removal is exact."""
    model = throwaway_copy(pruner.model)
    twin = type(pruner)(model, pruner._example, pruner.layers, pruner.target, pruner.importance, verify=False)
    twin.groups = [g for g in twin.groups if g.name in masks]
    for g in twin.groups:
        g.mask = masks[g.name].clone()
    try:
        twin.apply()
    except (IndexError, RuntimeError) as err:
        return f"masking fails ({type(err).__name__}: {err})"
    return check_removal(model, [pruner._example, *inputs], twin.kept_positions(), twin.replaced, twin.remove)


def _test_mask(channels: int) -> Tensor:
    """About half of ``channels`` pruned, at fixed random positions."""
    mask = torch.ones(channels, dtype=torch.bool)
    order = torch.randperm(channels, generator=torch.Generator().manual_seed(channels))
    mask[order[: channels // 2]] = False
    return mask
