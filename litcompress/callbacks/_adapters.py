"""Feature-distillation adapters that follow channel pruning (private: for ``_channels.py``).

A :class:`~litcompress.DistillationModule` with ``features`` holds, outside the student, one adapter per distilled
student layer: a map from that layer's output width to the teacher layer's (``adapters``, see
:func:`litcompress.distillation.make_adapters`). When channel pruning removes output channels of such a layer, the
adapter's input columns for those channels go with them: while the channels are masked the columns are zeroed with
the group (a consumer slice of the group, like the next layer's input columns), and the group's removal cuts them
(so mid-fit the optimizers carry the adapter's kept state like every other shrinking tensor). The masked model's
adapted features are then exactly the smaller model's.

Where that cannot be exact, the fit is refused before its first step, naming the layer: an identity adapter (the
student layer was as wide as the teacher's), a layer whose output channels are not one group's, or a layer whose
width changes in a way its adapter cannot see (checked by removing channels from a copy of the student).

The module is found duck-typed (``features``: student layer -> teacher layer, ``adapters``: an ``nn.ModuleDict``),
so the callbacks do not import :mod:`litcompress.modules`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from copy import deepcopy
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from litcompress._calls import call_model
from litcompress._validation import fail
from litcompress.distillation.features import adapter_key, capture, channel_dim
from litcompress.layers import HFConv1D, sync_sizes
from litcompress.sparsity._slice import NORMS as _NORMS
from litcompress.sparsity.channels import ChannelGroup, ChannelPruner

__all__: list[str] = []


def follow_adapters(pl_module: nn.Module, pruner: ChannelPruner, x: Any, who: str) -> None:
    """Make the feature adapters of ``pl_module`` (if any) follow ``pruner``'s channels: each adapter reading a
    pruned layer's output joins that layer's group (masked with it, cut when it is removed). Raises before anything
    changed when an adapter cannot follow exactly. ``x``: the input the pruner traced; ``who``: the callback."""
    pairs, adapters = getattr(pl_module, "features", None), getattr(pl_module, "adapters", None)
    if not isinstance(pairs, Mapping) or not isinstance(adapters, nn.ModuleDict) or not len(adapters):
        return  # no feature adapters (or the width-free "attention" loss): nothing to follow
    model = pruner.model
    modules = dict(model.named_modules())
    plan: list[tuple[ChannelGroup, Any]] = []  # (group, the adapter's slice)
    followed: dict[str, tuple[str, Tensor]] = {}  # student layer -> (its group, the root channel of each output)
    for s_name, t_name in pairs.items():
        layer = modules.get(s_name)
        if adapter_key(s_name) not in adapters or layer is None:
            continue
        adapter = adapters[adapter_key(s_name)]
        found = _output_slices(pruner, layer)
        if not found:
            continue  # its output channels stay (checked below on a copy)
        groups = {id(g): g for g, _ in found}
        slices = [s for _, s in found]
        index, root = torch.cat([s.index for s in slices]), torch.cat([s.root for s in slices])
        width = slices[0].tensor.shape[slices[0].dim]
        names = _selected(pruner, list(groups.values()), modules)
        if len(groups) > 1 or sorted(index.tolist()) != list(range(width)):
            _refuse(who, s_name, names, f"the output channels of `{s_name}` are not all in one group of coupled "
                    f"channels ({len(groups)} groups hold {index.numel()} of its {width} channels)")
        proj = getattr(adapter, "proj", None)
        if not isinstance(proj, nn.Linear) or proj.in_features != width:
            kind = (f"the identity (`{s_name}` is as wide as the teacher's `{t_name}`)"
                    if isinstance(adapter, nn.Identity) else f"a {type(adapter).__name__}")
            _refuse(who, s_name, names, f"the feature adapter of `{s_name}` is {kind}, which cannot lose inputs")
        group = next(iter(groups.values()))
        plan.append((group, dataclasses.replace(slices[0], module=proj, attr="weight", dim=1, index=index, root=root,
                                                producer=False)))
        followed[s_name] = (group.name, root)
    names = [s for s in pairs if adapter_key(s) in adapters and s in modules]
    _check_widths(pruner, x, names, followed, who)
    for group, s in plan:
        group.slices.append(s)
        group.remover = _FollowingRemover(group.remover, s)
    pruner.to_tensor_devices()  # the zeroed positions are listed again, with the adapters'


class _FollowingRemover:
    """Removes a group's channels from the model, then the same positions from the adapter that reads them."""

    def __init__(self, inner: Any, adapter_slice: Any) -> None:
        self.inner, self.slice = inner, adapter_slice

    def remove(self, keep: Tensor) -> None:
        self.inner.remove(keep)
        s = self.slice
        old = s.tensor
        gone = set(s.index[~keep[s.root]].tolist())
        kept = torch.tensor([i for i in range(old.shape[s.dim]) if i not in gone], dtype=torch.long)
        with torch.no_grad():
            new = nn.Parameter(old.index_select(s.dim, kept.to(old.device)).clone(), requires_grad=old.requires_grad)
        setattr(s.module, s.attr, new)
        sync_sizes(s.module)


def _output_dim(layer: nn.Module) -> tuple[str, int] | None:
    """The weight dimension of ``layer`` that holds its output channels (``None``: a kind without one)."""
    if isinstance(layer, nn.Linear):
        return "weight", 0
    if isinstance(layer, nn.modules.conv._ConvNd):
        return "weight", 1 if layer.transposed else 0
    if isinstance(layer, (HFConv1D, nn.Embedding)):
        return "weight", 1
    if isinstance(layer, _NORMS):
        return "weight", 0
    return None


def _output_slices(pruner: ChannelPruner, layer: nn.Module) -> list[tuple[ChannelGroup, Any]]:
    """The slices of ``pruner``'s groups that hold ``layer``'s output channels, with their groups."""
    where = _output_dim(layer)
    if where is None:
        return []
    return [(g, s) for g in pruner.groups for s in g.slices if s.module is layer and (s.attr, s.dim) == where]


def _selected(pruner: ChannelPruner, groups: list[ChannelGroup], modules: Mapping[str, nn.Module]) -> list[str]:
    """The selected layers whose output channels root ``groups`` (what `exclude` leaves whole)."""
    producers = {id(s.module) for g in groups for s in g.slices if s.producer}
    return [n for n in pruner.layers if id(modules[n]) in producers] or [g.name for g in groups]


def _refuse(who: str, layer: str, selected: list[str], why: str) -> NoReturn:
    fail("parameters", f"layers whose pruned channels the feature adapter of `{layer}` can follow", selected,
         hint=f"{why}. Leave {', '.join(f'`{n}`' for n in selected)} out of {who} (`exclude=`), or distil "
              "another student layer")


def _check_widths(pruner: ChannelPruner, x: Any, names: list[str], followed: Mapping[str, tuple[str, Tensor]],
                  who: str) -> None:
    """Remove about half of every group's channels from a copy of the student and check each distilled layer's
    output width there: the kept channels of its group when its adapter follows one, else unchanged."""
    if not names or not pruner.groups:
        return
    masks = {}
    for g in pruner.groups:
        mask = torch.ones(g.channels, dtype=torch.bool)
        mask[1::2] = False
        masks[g.name] = mask
    copy = deepcopy(pruner.model)
    twin = ChannelPruner(copy, x, pruner.layers, pruner.target, pruner.importance, verify=False)
    twin.groups = [g for g in twin.groups if g.name in masks]
    for g in twin.groups:
        g.mask = masks[g.name]
    twin.remove()
    before, after = _widths(pruner.model, x, names), _widths(copy, x, names)
    for name in names:
        if name not in before or name not in after:
            continue  # the traced input does not reach it
        expected = before[name]
        if name in followed:
            group, root = followed[name]
            expected = int(masks[group][root].sum())
        if after[name] != expected:
            modules = dict(pruner.model.named_modules())
            inside = [n for n in pruner.layers if n == name or n.startswith(name + ".")]
            _refuse(who, name, inside or list(pruner.layers),
                    f"removing channels changes the width of `{name}`'s output ({before[name]} -> {after[name]} "
                    f"where its adapter expects {expected}): an adapter follows a distilled Linear, Conv, BatchNorm "
                    f"or Embedding whose own output channels are pruned, not a {type(modules[name]).__name__} "
                    "whose inner layers lose channels")


def _widths(model: nn.Module, x: Any, names: list[str]) -> dict[str, int]:
    """The feature width of each named layer's output on ``x`` (eval mode, no gradients; the mode is restored)."""
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, names) as found:
            call_model(model, x)
    finally:
        model.train(was_training)
    out = {}
    for name, feature in found.items():
        dim = channel_dim(modules[name])
        out[name] = int(feature.shape[dim if feature.dim() > 2 else -1])
    return out
