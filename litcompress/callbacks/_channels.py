"""The Lightning side of removing channels, shared by `ChannelPruning` (masked channels and heads) and
`Pruning(remove_channels=True)` (dead channels): tracing the coupled-channel graph on a batch, removing the channels
at the end or mid-fit, and rank zero's smaller copy under FSDP2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from litcompress._extras import require
from litcompress._validation import fail, fail_state
from litcompress.callbacks._adapters import follow_adapters
from litcompress.callbacks._base import _compression_target
from litcompress.callbacks._inputs import first_batch_inputs
from litcompress.callbacks._pruning_base import _PruningBase
from litcompress.callbacks._structure import point_optimizers
from litcompress.layers import HFConv1D
from litcompress.quantization.layers import QuantizedLayer
from litcompress.selection import ParameterRef
from litcompress.sparsity._verify import check_removal
from litcompress.sparsity.channels import ChannelPruner
from litcompress.sparsity.dead import DeadChannels
from litcompress.structure import keep_slices

__all__: list[str] = []

_ROOTS = (nn.Linear, nn.modules.conv._ConvNd, HFConv1D, nn.MultiheadAttention)


def build_channel_pruner(callback: _PruningBase, trainer: pl.Trainer, pl_module: pl.LightningModule,
                         refs: Sequence[ParameterRef], dead: bool = False) -> tuple[ChannelPruner, Any]:
    """Trace the compressed model on ``example_input`` (else the first training batch) and mask the output
    channels of the selected Linear and Conv layers, with everything coupled to them. ``dead=True``: only trace
    (unstructured pruning with ``remove_channels=True``: all-zero channels are removed at the end). Returns the
    pruner and the input it traced."""
    what = "Pruning(remove_channels=True)" if dead else "ChannelPruning"
    require("torch_pruning", what=what)
    target = _compression_target(pl_module)
    learned = [n for n, m in target.named_modules() if isinstance(m, QuantizedLayer)
               and any(q.config.scale == "learned" for q in m.weight_quantizers.values())]
    if learned:
        fail("remove_channels", f"False with {what} and QuantizationAwareTraining(scale='learned')", True,
             hint=f"learned per-channel step sizes ({learned[0]}, ...) cannot shrink with their layer; use "
                  "scale='minmax' or 'power_of_two'")
    layers = sorted({r.module_name for r in refs if isinstance(r.module, _ROOTS)},
                    key=list(dict(target.named_modules())).index)
    if not layers:
        fail("parameters", f"a selection with Linear or Conv layers for {what}", [r.name for r in refs])
    x = callback.example_input
    if x is None:
        x = pl_module.example_input_array
    if x is None:
        x = first_batch_inputs(trainer, pl_module, type(callback).__name__)
    x = {k: v.to(pl_module.device) for k, v in x.items()} if isinstance(x, Mapping) else (
        x.to(pl_module.device) if isinstance(x, Tensor) else x)
    was_training = target.training
    target.eval()
    try:
        # ChannelPruning takes one float sparsity and a named importance (checked in its __init__)
        pruner = ChannelPruner(target, x, layers, 0.0 if dead else cast(float, callback.sparsity),
                               "magnitude" if dead else cast(str, callback.importance), refs=refs)
    finally:
        target.train(was_training)
    if not pruner.groups:
        fail("parameters", "layers with output channels that can be removed", layers,
             hint="every selected layer is a model output or coupled to a layer that cannot shrink exactly: "
                  + "; ".join(f"{k}: {v}" for k, v in pruner.skipped.items()))
    follow_adapters(pl_module, pruner, x, what)  # feature-distillation adapters follow their layers' channels
    if pruner.skipped:
        rank_zero_warn(f"{what}: {len(pruner.skipped)} layer(s) keep all their channels: "
                       + "; ".join(f"{k}: {v}" for k, v in pruner.skipped.items()))
    if callback.verbose:
        rank_zero_info(f"{type(callback).__name__}: {len(pruner.groups)} channel groups over {len(layers)} layers")
    return pruner, x


def remove_dead_channels(callback: _PruningBase, pruner: ChannelPruner, x: Any,
                         inputs: Sequence[Any] = ()) -> dict[str, tuple[int, int]]:
    """Remove the channels unstructured pruning zeroed entirely (their constant output folded into the consumers'
    biases): the model computes what it computed, with smaller layers. The removal is tried on a copy first and
    checked on ``x`` and ``inputs``: if the copy computes anything else, nothing is removed (a warning says why)."""
    before = sum(p.numel() for p in pruner.model.parameters())
    dead = DeadChannels(pruner, x)
    why = dead.check(inputs)
    if why is not None:
        rank_zero_warn(f"Pruning(remove_channels=True): the all-zero channels stay (zeros, not removed): {why}")
        return {}
    removed = dead.remove()
    if dead.kept:
        rank_zero_warn("Pruning(remove_channels=True): some all-zero channels stay: "
                       + "; ".join(f"{k}: {v}" for k, v in dead.kept.items()))
    if callback.verbose:
        after = sum(p.numel() for p in pruner.model.parameters())
        rank_zero_info(f"{type(callback).__name__}: removed {sum(b - a for b, a in removed.values())} all-zero "
                       f"channels from {len(removed)} groups; parameters {before:,} -> {after:,}")
    return removed


def _keep_inexact(callback: _PruningBase, pruner: ChannelPruner, inputs: Sequence[Any], mid_fit: bool) -> None:
    """Try the removal on a copy of the model first, checked on the traced input and ``inputs`` (the last training
    batches): the groups whose removal would change the model's outputs keep their channels, masked, with a warning
    (mid-fit: an error, before anything changed)."""
    why = pruner.check_removal(inputs)
    if why is None:
        return
    masked = [g.name for g in pruner.groups if g.mask is not None and not bool(g.mask.all())]
    bad = {n: w for n in masked if (w := pruner.check_removal(inputs, groups=[n])) is not None}
    rest = [n for n in masked if n not in bad]
    if not bad or (rest and pruner.check_removal(inputs, groups=rest) is not None):
        bad = {n: bad.get(n, why) for n in masked}  # exact one by one, not together: none is removed
    text = "; ".join(f"`{k}`: {v}" for k, v in bad.items())
    reason = ("the smaller model would not compute what the masked model computes (the dependency graph was traced "
              "on one input, so it follows the path that input takes: a data-dependent branch it did not take does "
              f"not shrink): {text}")
    if mid_fit:
        fail_state(f"the channels of {len(bad)} group(s) cannot be removed at `remove_at` (nothing was changed): "
                   + reason, type(callback).__name__,
                   "remove the channels at the end of the fit (remove_at=None: such groups then stay masked), or "
                   "leave these layers out with `exclude`")
    pruner.groups = [g for g in pruner.groups if g.name not in bad]
    rank_zero_warn(f"{type(callback).__name__}: {len(bad)} channel group(s) stay masked (zeros), not removed, "
                   f"because {reason}")


def remove_channels_mid_fit(callback: _PruningBase, trainer: pl.Trainer, pruner: ChannelPruner,
                            inputs: Sequence[Any] = ()) -> dict[str, tuple[int, int]]:
    """Delete the masked channels during the fit, checked first (see :func:`remove_channels`): the optimizers then
    hold the smaller tensors, each with the kept slices of its state (momentum, Adam moments), and frozen
    per-channel weight scales shrink with them."""
    _keep_inexact(callback, pruner, inputs, mid_fit=True)
    kept = pruner.kept_positions()
    old = {key: getattr(*key) for key in kept}
    removed = _remove(callback, pruner)
    replacements = {}
    for (module, attr), dims in kept.items():
        new = getattr(pruner.replaced.get(module, module), attr)  # an attention layer that lost heads is replaced
        if new is not old[(module, attr)]:
            replacements[old[(module, attr)]] = [(new, keep_slices(dims))]
    point_optimizers(trainer, type(callback).__name__, replacements)
    return removed


def remove_channels(callback: _PruningBase, pruner: ChannelPruner,
                    inputs: Sequence[Any] = ()) -> dict[str, tuple[int, int]]:
    """Delete the masked channels: the model becomes an ordinary smaller ``nn.Module``. The removal is tried on a
    copy of the model first and checked on the traced input and ``inputs``: groups whose removal would change the
    outputs stay masked, with a warning."""
    _keep_inexact(callback, pruner, inputs, mid_fit=False)
    return _remove(callback, pruner)


def _remove(callback: _PruningBase, pruner: ChannelPruner) -> dict[str, tuple[int, int]]:
    before = sum(p.numel() for p in pruner.model.parameters())
    removed = pruner.remove()
    after = sum(p.numel() for p in pruner.model.parameters())
    if callback.verbose:
        rank_zero_info(f"{type(callback).__name__}: removed channels from {len(removed)} groups; parameters "
                       f"{before:,} -> {after:,}")
    return removed


def smaller_copy(callback: _PruningBase, pruner: ChannelPruner, traced: Any, dead: bool = False,
                 inputs: Sequence[Any] = ()) -> tuple[dict[str, tuple[int, int]], Any]:
    """FSDP2: the sharded model keeps its size (its channels masked, or zeroed by unstructured pruning); rank zero
    gathers a whole copy (the model's memory once, on its CPU; twice while the removal is checked), traces it again
    and removes from it the masked channels (``dead``: the all-zero ones), checked as :func:`remove_channels` does.
    Collective. Returns what was removed and the copy (``None`` elsewhere)."""
    from litcompress.distributed import gather_model

    copy = gather_model(pruner.model)
    if copy is None:
        return {}, None
    for module in copy.modules():  # the copy shares the sharded model's quantizers: it shrinks its own
        if isinstance(module, QuantizedLayer):
            module.weight_quantizers = deepcopy(module.weight_quantizers)
    x = move_data_to_device(traced, "cpu")  # the copy lives on rank zero's CPU
    inputs = [move_data_to_device(i, "cpu") for i in inputs]
    was_training = copy.training
    copy.eval()
    try:
        twin = ChannelPruner(copy, x, pruner.layers, 0.0 if dead else pruner.target,
                             "magnitude" if dead else pruner.importance, verify=False)
    finally:
        copy.train(was_training)
    # the copy is rank zero's own: the removal is checked on it in place (the sharded model cannot be copied again)
    names = {g.name for g in pruner.groups}
    twin.groups = [g for g in twin.groups if g.name in names]  # the groups the sharded model's dry run kept
    done: dict[str, tuple[int, int]] = {}
    remover: DeadChannels | ChannelPruner
    if dead:
        remover = DeadChannels(twin, x)
        kept: Any = {}
    else:
        twin.load_state_dict({"masks": {g.name: g.mask for g in pruner.groups if g.mask is not None}})
        remover, kept = twin, twin.kept_positions()
    why = check_removal(copy, [x, *inputs], kept, twin.replaced, lambda: done.update(remover.remove()))
    if why is not None:
        rank_zero_warn(f"{type(callback).__name__}: no smaller copy is made, because removing the channels from it "
                       f"would change what it computes: {why}. The sharded model is whole (masked): gather it with "
                       "`litcompress.distributed.gather_model`")
        return {}, None
    return done, copy
