"""Structured pruning: whole output channels (Conv filters, Linear neurons) masked during training, then removed.

Channels are coupled: a Conv's output channel is also a BatchNorm channel and an input channel of every layer that
reads it, and a residual add ties the same channel of several layers together. The dependency graph comes from
Torch-Pruning (``pip install "litcompress[structured]"``): each :class:`ChannelGroup` is one such set of coupled
channels, masked together and removed together, so the masked model computes exactly what the smaller model will.

Masking zeroes a pruned channel everywhere it lives: the producers' output rows and biases, BatchNorm's scale and
shift, and the consumers' input columns; :meth:`ChannelPruner.remove` then deletes those slices (Torch-Pruning's
``Group.prune``) and the result is an ordinary, smaller ``nn.Module``.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
>>> pruner = ChannelPruner(model, torch.randn(2, 8), layers=["0"], sparsity=0.5)
>>> pruner.update(1.0)
{'0': 0.5}
>>> pruner.remove()
{'0': (16, 8)}
>>> model[0].out_features, model[2].in_features
(8, 8)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._calls import call_model
from litcompress._extras import require
from litcompress._shards import local
from litcompress._validation import check_choice, check_fraction, fail
from litcompress.layers import HFConv1D
from litcompress.quantization._base import QuantizedLayer
from litcompress.sparsity._local import LocalView
from litcompress.sparsity._remover import _Remover
from litcompress.sparsity._slice import NORMS as _NORMS
from litcompress.sparsity._slice import _Slice, member_slices
from litcompress.sparsity._tp import coupled_groups, output_layers, trace
from litcompress.sparsity._verify import dry_run, tied_names, try_removal
from litcompress.sparsity.hf_heads import AttentionPlan, traceable

__all__ = ["CHANNEL_IMPORTANCES", "ChannelGroup", "ChannelPruner"]

CHANNEL_IMPORTANCES = ("magnitude", "l1", "taylor", "bn_scale")
"""``magnitude``: L2 norm of a channel's weights over its whole group; ``l1``: L1 norm; ``taylor``: accumulated
``|w * grad|`` (first-order Taylor estimate of the loss change); ``bn_scale``: ``|gamma|`` of the group's
BatchNorm layers (network slimming)."""

_ATTENTION = (nn.MultiheadAttention,)
_ROOTS = (nn.Linear, nn.modules.conv._ConvNd, HFConv1D)  # the layers whose output channels root a group


@dataclass
class ChannelGroup:
    """Coupled channels: pruned together, removed together.

    Attributes:
        name: the root layer (the first selected layer of the group, in module order).
        channels: the number of channels.
        slices: every parameter slice the group's channels live in.
        mask: ``True`` for kept channels (``None`` before the first update).
        remover: what deletes the pruned channels from the model (Torch-Pruning's coupled layers, or whole heads).
    """

    name: str
    channels: int
    slices: list[_Slice]
    remover: _Remover = field(repr=False)  # deletes the pruned channels (Torch-Pruning's, or a head remover's)
    mask: Tensor | None = None

    def zero_index(self, s: _Slice) -> Tensor:
        """Positions of ``s`` that belong to pruned channels."""
        assert self.mask is not None
        return s.index[~self.mask[s.root]]


class ChannelPruner:
    """Masks whole channels of ``layers`` (and everything coupled to them), scheduled toward ``sparsity``.

    Args:
        model: the model.
        example_input: one input batch (a tensor, a tuple of positional inputs, or a mapping of keyword inputs),
            traced once to find which channels are coupled.
        layers: names of the Linear / Conv layers whose output channels may be pruned (the model's output layers
            never are: their channels are the model's outputs), and of ``nn.MultiheadAttention`` layers, whose
            whole heads are pruned (:mod:`litcompress.sparsity.heads`). Hugging Face attention blocks whose query,
            key or value projection is selected lose whole heads too (:mod:`litcompress.sparsity.hf_heads`).
        sparsity: the final fraction of channels removed from each group.
        importance: one of :data:`CHANNEL_IMPORTANCES`.
        verify: before masking anything, remove about half of every group's channels from a copy of the model and
            check that exactly the masked positions go and that the copy computes what the masked model computes on
            ``example_input``; a group that fails is left alone, with the reason in :attr:`skipped`. The graph
            is traced on one input, so it sees the path that input takes: check the removal on more inputs with
            :meth:`check_removal` before :meth:`remove`.

    Groups touching a weight that several layers share (tied weights) are left alone too: removing channels would
    untie them.
    """

    def __init__(self, model: nn.Module, example_input: Any, layers: Sequence[str], sparsity: float,
                 importance: str = "magnitude", refs: Sequence[Any] = (), verify: bool = True) -> None:
        require("torch_pruning", what="channel pruning")
        check_fraction("sparsity", sparsity)
        check_choice("importance", importance, CHANNEL_IMPORTANCES)
        modules = dict(model.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            fail("layers", "names of layers of the model", unknown)
        self.model, self.target, self.importance = model, float(sparsity), importance
        self.layers = list(layers)
        self.refs = list(refs)  # the selected tensors (for callers that check two pruners do not overlap)
        if isinstance(example_input, Mapping):  # keyword inputs (a Hugging Face batch)
            example_input = dict(example_input)
        try:
            with torch.no_grad():
                call_model(model, example_input)
        except Exception as err:
            fail("example_input", "an input the model runs on", type(example_input).__name__,
                 hint=f"the model fails on it ({type(err).__name__}: {err}); pass what its forward takes (a tensor, "
                      "a tuple of positional inputs or a mapping of keyword inputs) on the model's device, with the "
                      "dtype its first layer expects")
        plan = AttentionPlan.of(model)  # Hugging Face attention: heads pruned whole, never channel by channel
        try:
            with traceable(plan.blocks.values()):
                graph = trace(model, example_input)  # norms it does not know (RMSNorm): their groups skipped below
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as err:
            fail("model", "a model whose coupled channels Torch-Pruning can trace", type(model).__name__,
                 hint=f"the model runs on `example_input`, but tracing its dependency graph failed "
                      f"({type(err).__name__}: {err}); prune it with `Pruning` (unstructured or N:M) instead")
        names = {m: n for n, m in modules.items()}
        tied = tied_names(model)
        selected = {modules[n] for n in layers}
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}  # root layer -> why its channels are left alone
        self.replaced: dict[nn.Module, nn.Module] = {}  # attention layers that lost heads -> their replacements
        projections = plan.keep
        outputs = output_layers(graph, _ROOTS, _NORMS)
        ignored = outputs + list(projections)  # outputs: the model's, never pruned
        covered = set(outputs)  # selected layers whose output channels some group (or the output) accounts for
        for coupled in coupled_groups(graph, _ROOTS, ignored):
            producers = [m.module for m in coupled.members if m.producer and isinstance(m.module, _ROOTS)]
            if not any(p in selected for p in producers):
                continue
            covered.update(producers)
            name = min((names[p] for p in producers if p in selected), key=list(modules).index)
            slices, why = member_slices(coupled.members, names)
            why = why or next((projections[s.module] for s in slices if s.module in projections), None)
            why = why or next((f"{' and '.join(f'`{n}`' for n in tied[id(s.tensor)])} are one tensor (tied "
                               "weights): removing channels would untie them" for s in slices if id(s.tensor) in tied),
                              None)
            if why is not None:
                self.skipped[name] = why
                continue
            self.groups.append(ChannelGroup(name, coupled.channels, slices, coupled.remover))
        self._add_heads(model, [n for n in layers if isinstance(modules[n], _ATTENTION)])
        heads, why_not = plan.selected(selected)
        self.groups += [ChannelGroup(name, b.units, b.slices(), b) for name, b in heads.items()]
        self.skipped |= why_not
        covered |= {s.module for g in self.groups for s in g.slices if s.producer}
        for n in layers:  # e.g. a transformer's residual stream: Torch-Pruning roots no group there
            if isinstance(modules[n], _ROOTS) and modules[n] not in covered and n not in self.skipped:
                self.skipped[n] = ("no group of coupled channels that can be removed starts at its outputs (in a "
                                   "transformer: the residual stream every block adds to and normalizes): its width "
                                   "stays")
        self.scores: dict[str, Tensor] = {}
        self.local: LocalView | None = None  # FSDP2 row shards (see `follow_layout`)
        self._zero_index: list[tuple[_Slice, Tensor]] | None = None
        self._example = example_input  # traced: what `check_removal` traces its copy on
        if importance == "bn_scale":
            for g in self.groups:
                if not any(isinstance(s.module, _NORMS) for s in g.slices):
                    fail("importance", "'bn_scale' only for layers followed by BatchNorm", importance,
                         hint=f"`{g.name}` has no BatchNorm; use 'magnitude' or exclude it")
        if verify and self.groups:
            self.skipped |= dry_run(self)

    # ------------------------------------------------------------------ checks
    def check_removal(self, inputs: Sequence[Any] = (), groups: Sequence[str] | None = None) -> str | None:
        """Remove the masked channels from a copy of the model and check the copy against the masked model: every
        tensor keeps exactly the positions its masks keep, tied weights stay tied, and the outputs on the traced
        input and on each of ``inputs`` agree within float tolerance. Returns what differs, or ``None``.

        Call it before :meth:`remove` with inputs the model will see (the tracing saw one path through the model; a
        data-dependent branch it did not take may not shrink). Costs a copy of the model and one tracing.
        ``groups``: check only these groups' removal (default: every masked group).

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> pruner = ChannelPruner(model, torch.randn(2, 8), layers=["0"], sparsity=0.5)
        >>> _ = pruner.update(1.0)
        >>> pruner.check_removal([torch.randn(5, 8)]) is None
        True
        """
        masks = {g.name: g.mask for g in self.groups if g.mask is not None and (groups is None or g.name in groups)}
        return try_removal(self, masks, list(inputs)) if masks else None

    def _add_heads(self, model: nn.Module, names: list[str]) -> None:
        """One group per attention layer: its heads (see :mod:`litcompress.sparsity.heads`)."""
        from litcompress.sparsity.heads import _HeadRemover, head_slices, heads_stay

        modules = dict(model.named_modules())
        for name in names:
            attn = modules[name]
            why = heads_stay(attn)
            if why is not None:
                self.skipped[name] = why
            else:
                remover = _HeadRemover(model, name, self.replaced)  # replaces the layer by a smaller one
                self.groups.append(ChannelGroup(name, int(attn.num_heads), head_slices(attn), remover))

    # ------------------------------------------------------------------ importance
    @property
    def data_dependent(self) -> bool:
        """Whether importance needs gradients (:meth:`accumulate` after every backward)."""
        return self.importance == "taylor"

    def accumulate(self, only: set[int] | None = None, skip_nonfinite: bool = False) -> bool:
        """Add this step's ``|w * grad|`` per channel (``importance="taylor"``); call after ``backward``.

        Args:
            only: ids of the tensors to consider (those of the optimizer about to step); ``None`` for all.
            skip_nonfinite: skip the step if a gradient holds inf/NaN (a step a GradScaler will discard).
        """
        if self.importance != "taylor":
            return False
        grads = [s.tensor.grad for g in self.groups for s in g.slices if s.producer and s.tensor.grad is not None
                 and (only is None or id(s.tensor) in only)]
        if not grads or (skip_nonfinite and not all(bool(torch.isfinite(x).all()) for x in grads)):
            return False
        for g in self.groups:
            score = self.scores.setdefault(g.name, torch.zeros(g.channels))
            for s in g.slices:
                t = s.tensor
                if s.producer and t.grad is not None and (only is None or id(t) in only):
                    grad = local(t.grad)
                    self._add(score, s, lambda w: (w * grad).abs())  # noqa: B023 - used at once
        return True

    def _add(self, score: Tensor, s: _Slice, fn: Any) -> None:
        """Add ``fn(weights)`` of ``s``, summed per position, to its channels' scores (this process's rows)."""
        t, index, root = self.local.part(s) if self.local is not None else (s.tensor, s.index, s.root)
        if not index.numel() or (self.local is not None and not self.local.adds(s)):
            return
        value = fn(t.detach().float())
        dims = [d for d in range(value.dim()) if d != s.dim]
        total = value.sum(dim=dims) if dims else value
        score.index_add_(0, root, total[index.to(total.device)].cpu())

    def group_scores(self) -> dict[str, Tensor]:
        """One score per channel of every group (higher: more important)."""
        out = {}
        for g in self.groups:
            if self.importance == "taylor":
                out[g.name] = self.scores.get(g.name, torch.zeros(g.channels)).clone()
                continue
            score = torch.zeros(g.channels)
            for s in g.slices:
                if self.importance == "bn_scale":
                    if isinstance(s.module, _NORMS) and s.attr == "weight":
                        self._add(score, s, torch.abs)
                elif s.producer:
                    self._add(score, s, torch.abs if self.importance == "l1" else torch.square)
            out[g.name] = score
        if self.local is not None and out:  # each process scored its rows: one sum over processes
            flat = self.local.sum(torch.cat(list(out.values())))
            out = dict(zip(out, flat.split([v.numel() for v in out.values()])))
        return {k: v.sqrt() for k, v in out.items()} if self.importance == "magnitude" else out

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def update(self, fraction: float, reduce: Any = None) -> dict[str, float]:
        """Prune ``fraction`` of the final ``sparsity`` of every group's channels (never reviving one); returns the
        fraction of channels pruned per group. ``reduce`` averages Taylor scores over processes."""
        check_fraction("fraction", fraction, closed_right=True)
        scores = self.group_scores()
        if reduce is not None and self.data_dependent and scores and self.local is None:
            flat = reduce(torch.cat(list(scores.values())))
            scores = dict(zip(scores, flat.cpu().split([g.channels for g in self.groups])))
        if self.importance == "taylor":
            self.scores.clear()  # evidence counts since the last update
        for g in self.groups:
            prune = min(g.channels - 1, round(fraction * self.target * g.channels))
            score = scores[g.name].clone()
            if g.mask is not None:
                score[~g.mask] = -float("inf")  # pruned channels stay pruned, and are counted first
            order = torch.argsort(score, stable=True)
            mask = torch.ones(g.channels, dtype=torch.bool)
            mask[order[:prune]] = False
            if g.mask is not None:
                mask &= g.mask
            g.mask = mask
        self._zero_index = None
        self.apply()
        return self.sparsity()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every slice of every pruned channel in place (after each optimizer step)."""
        if self._zero_index is None:
            pairs = [(s, g.zero_index(s)) for g in self.groups if g.mask is not None for s in g.slices]
            if self.local is not None:  # this process's rows, in local coordinates
                pairs = [(s, self.local.positions(s, index)[0]) for s, index in pairs]
            self._zero_index = [(s, index.to(local(s.tensor).device)) for s, index in pairs]
        for s, index in self._zero_index:
            if index.numel():
                local(s.tensor).index_fill_(s.dim, index, 0.0)

    def sparsity(self) -> dict[str, float]:
        """Fraction of pruned channels of every group."""
        return {g.name: 0.0 if g.mask is None else 1 - int(g.mask.sum()) / g.channels for g in self.groups}

    def global_sparsity(self) -> float:
        """Fraction of pruned channels over all groups together."""
        total = sum(g.channels for g in self.groups)
        kept = sum(g.channels if g.mask is None else int(g.mask.sum()) for g in self.groups)
        return 1.0 - kept / total if total else 0.0

    def to_tensor_devices(self) -> None:
        """Indices follow their tensors on the next :meth:`apply` (after a checkpoint load or a device move)."""
        self._zero_index = None

    def follow_layout(self) -> None:
        """Re-read how the tensors are laid out, after FSDP2 sharded them (the groups were traced on the whole
        model): scores and zeroing then use this process's rows, and per-channel sums are added up over processes.
        Collective: call it on every process."""
        if self.local is None:
            self.local = LocalView.of([s for g in self.groups for s in g.slices])
            if self.local is not None and self.local.shards.rank != 0:
                self.scores = {k: torch.zeros_like(v) for k, v in self.scores.items()}  # totals: added once
            self._zero_index = None

    # ------------------------------------------------------------------ removal
    def kept_positions(self) -> dict[tuple[nn.Module, str], dict[int, Tensor]]:
        """For every tensor that :meth:`remove` will shrink: the positions it keeps along each shrinking dimension
        (what an optimizer's state for it keeps, :func:`litcompress.structure.keep_slices`)."""
        pruned: dict[tuple[nn.Module, str], dict[int, set[int]]] = {}
        for g in self.groups:
            if g.mask is None:
                continue
            for s in g.slices:
                index = g.zero_index(s)
                if index.numel():
                    pruned.setdefault((s.module, s.attr), {}).setdefault(s.dim, set()).update(index.tolist())
        out: dict[tuple[nn.Module, str], dict[int, Tensor]] = {}
        for (module, attr), dims in pruned.items():
            size = getattr(module, attr).shape
            out[(module, attr)] = {d: torch.tensor([i for i in range(size[d]) if i not in gone], dtype=torch.long)
                                   for d, gone in dims.items()}
        return out

    @torch.no_grad()
    def remove(self) -> dict[str, tuple[int, int]]:
        """Delete the pruned channels from the model (Torch-Pruning's ``Group.prune``): layers, BatchNorms and
        consumers shrink together; attention loses whole heads (an ``nn.MultiheadAttention`` is replaced, see
        :attr:`replaced`); frozen per-channel scales of quantization-aware layers keep the kept channels'.
        Returns ``{group: (channels before, after)}``; the masks are then spent."""
        kept = self.kept_positions()
        done = {}
        for g in self.groups:
            if g.mask is None:
                continue
            if not bool(g.mask.all()):
                g.remover.remove(g.mask)
            done[g.name] = (g.channels, int(g.mask.sum()))
        for (module, attr), dims in kept.items():  # frozen per-channel weight scales shrink with their weights
            if isinstance(module, QuantizedLayer) and attr in module.weight_quantizers:
                module.weight_quantizers[attr].keep_channels(dims)
        self.groups = []
        self._zero_index = None
        self._example = None
        return done

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks (the same on every process) and Taylor scores (on shards: summed over processes, so collective)."""
        scores = dict(self.scores)
        if self.local is not None and scores:
            flat = self.local.sum(torch.cat(list(scores.values())))
            scores = dict(zip(scores, flat.split([v.numel() for v in scores.values()])))
        return {"masks": {g.name: g.mask for g in self.groups if g.mask is not None}, "scores": scores}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        by_name = {g.name: g for g in self.groups}
        for name, mask in state.get("masks", {}).items():
            if name not in by_name or mask.shape != (by_name[name].channels,):
                fail("state_dict", f"channel masks for the groups {sorted(by_name)}", name,
                      hint="the checkpoint was written for a different model or a different selection")
            by_name[name].mask = mask.bool().cpu()
        self.scores = {k: v.cpu() for k, v in state.get("scores", {}).items()}
        if self.local is not None and self.local.shards.rank != 0:  # saved as totals: counted once, on rank zero
            self.scores = {k: torch.zeros_like(v) for k, v in self.scores.items()}
        self._zero_index = None

