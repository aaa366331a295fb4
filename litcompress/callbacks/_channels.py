"""The Lightning side of removing channels, shared by `ChannelPruning` (masked channels and heads) and
`Pruning(remove_channels=True)` (dead channels): tracing the coupled-channel graph on a batch, removing the channels
at the end or mid-fit, and rank zero's smaller copy under FSDP2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from litcompress._extras import require
from litcompress._validation import fail
from litcompress.callbacks._base import _compression_target
from litcompress.callbacks._inputs import first_batch_inputs
from litcompress.callbacks._pruning_base import _PruningBase
from litcompress.callbacks._structure import point_optimizers
from litcompress.layers import HFConv1D
from litcompress.quantization.layers import QuantizedLayer
from litcompress.selection import ParameterRef
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
    if pruner.skipped:
        rank_zero_warn(f"{what}: {len(pruner.skipped)} layer(s) keep all their channels: "
                       + "; ".join(f"{k}: {v}" for k, v in pruner.skipped.items()))
    if callback.verbose:
        rank_zero_info(f"{type(callback).__name__}: {len(pruner.groups)} channel groups over {len(layers)} layers")
    return pruner, x


def remove_dead_channels(callback: _PruningBase, pruner: ChannelPruner, x: Any) -> dict[str, tuple[int, int]]:
    """Remove the channels unstructured pruning zeroed entirely (their constant output folded into the consumers'
    biases): the model computes what it computed, with smaller layers."""
    before = sum(p.numel() for p in pruner.model.parameters())
    dead = DeadChannels(pruner, x)
    removed = dead.remove()
    if dead.kept:
        rank_zero_warn("Pruning(remove_channels=True): some all-zero channels stay: "
                       + "; ".join(f"{k}: {v}" for k, v in dead.kept.items()))
    if callback.verbose:
        after = sum(p.numel() for p in pruner.model.parameters())
        rank_zero_info(f"{type(callback).__name__}: removed {sum(b - a for b, a in removed.values())} all-zero "
                       f"channels from {len(removed)} groups; parameters {before:,} -> {after:,}")
    return removed


def remove_channels_mid_fit(callback: _PruningBase, trainer: pl.Trainer,
                            pruner: ChannelPruner) -> dict[str, tuple[int, int]]:
    """Delete the masked channels during the fit: the optimizers then hold the smaller tensors, each with the
    kept slices of its state (momentum, Adam moments), and frozen per-channel weight scales shrink with them."""
    kept = pruner.kept_positions()
    old = {key: getattr(*key) for key in kept}
    removed = remove_channels(callback, pruner)
    replacements = {}
    for (module, attr), dims in kept.items():
        new = getattr(pruner.replaced.get(module, module), attr)  # an attention layer that lost heads is replaced
        if new is not old[(module, attr)]:
            replacements[old[(module, attr)]] = [(new, keep_slices(dims))]
        if isinstance(module, QuantizedLayer) and attr in module.weight_quantizers:
            module.weight_quantizers[attr].keep_channels(dims)
    point_optimizers(trainer, type(callback).__name__, replacements)
    return removed


def remove_channels(callback: _PruningBase, pruner: ChannelPruner) -> dict[str, tuple[int, int]]:
    """Delete the masked channels: the model becomes an ordinary smaller ``nn.Module``."""
    before = sum(p.numel() for p in pruner.model.parameters())
    removed = pruner.remove()
    after = sum(p.numel() for p in pruner.model.parameters())
    if callback.verbose:
        rank_zero_info(f"{type(callback).__name__}: removed channels from {len(removed)} groups; parameters "
                       f"{before:,} -> {after:,}")
    return removed


def smaller_copy(callback: _PruningBase, pruner: ChannelPruner, traced: Any,
                 dead: bool = False) -> tuple[dict[str, tuple[int, int]], Any]:
    """FSDP2: the sharded model keeps its size (its channels masked, or zeroed by unstructured pruning); rank zero
    gathers a whole copy (the model's memory once, on its CPU), traces it again and removes from it the masked
    channels (``dead``: the all-zero ones). Collective. Returns what was removed and the copy (``None`` elsewhere)."""
    from litcompress.distributed import gather_model

    copy = gather_model(pruner.model)
    if copy is None:
        return {}, None
    x = move_data_to_device(traced, "cpu")  # the copy lives on rank zero's CPU
    was_training = copy.training
    copy.eval()
    try:
        twin = ChannelPruner(copy, x, pruner.layers, 0.0 if dead else pruner.target,
                             "magnitude" if dead else pruner.importance)
    finally:
        copy.train(was_training)
    if dead:
        return remove_dead_channels(callback, twin, x), copy
    twin.load_state_dict({"masks": {g.name: g.mask for g in pruner.groups if g.mask is not None}})
    return remove_channels(callback, twin), copy
