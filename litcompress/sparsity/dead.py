"""Dead channels: output channels (neurons, filters) whose weights unstructured pruning zeroed entirely, removed.

A channel whose weights are all zero still outputs a constant (its bias, through BatchNorm and the activation).
It is removed exactly when that constant can be folded into its consumers: into the bias of a Linear (or
transformers ``Conv1D``) that reads it, or of an unpadded convolution; a zero constant needs no folding. The constant
is read, not derived: each consumer's input is recorded on ``example_input`` and the channel's value must be the
same everywhere in it. A channel whose value varies (a residual add with a live branch) or that feeds a layer
without a bias, or a padded convolution, is kept, with the reason in :attr:`DeadChannels.kept`.

>>> import torch
>>> from torch import nn
>>> from litcompress.sparsity.channels import ChannelPruner
>>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
>>> with torch.no_grad():
...     model[0].weight[:3] = 0  # three neurons pruned away by unstructured pruning
>>> x = torch.randn(8, 4)
>>> before = model(x)
>>> dead = DeadChannels(ChannelPruner(model, x, ["0"], sparsity=0.0), x)
>>> dead.remove()
{'0': (6, 3)}
>>> model[0].out_features, torch.allclose(model(x), before, atol=1e-6)
(3, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._calls import call_model
from litcompress.layers import HFConv1D
from litcompress.quantization._base import QuantizedLayer
from litcompress.sparsity._slice import _Slice
from litcompress.sparsity._verify import check_removal, throwaway_copy
from litcompress.sparsity.channels import ChannelGroup, ChannelPruner

__all__ = ["DeadChannels"]

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, HFConv1D)


class DeadChannels:
    """The all-zero channels of a traced model, and how to remove them without changing its outputs.

    Args:
        pruner: a :class:`~litcompress.sparsity.channels.ChannelPruner` over the layers to look at (any sparsity:
            its masks are replaced).
        example_input: a batch the model is run on once, to read the constant each dead channel outputs.
        atol: how far from constant a dead channel's value may vary (float noise).

    Attributes:
        dead: per group, the channels whose weights are all zero.
        kept: per group, why some dead channels stay.
    """

    def __init__(self, pruner: ChannelPruner, example_input: Any, atol: float = 1e-6) -> None:
        self.pruner, self.atol, self.example_input = pruner, atol, example_input
        self.dead: dict[str, Tensor] = {}
        self.kept: dict[str, str] = {}
        self._folds: list[tuple[nn.Module, Tensor]] = []  # (consumer, bias increment)
        for g in pruner.groups:
            dead = self._all_zero(g)
            if bool(dead.any()):
                self.dead[g.name] = dead
        if self.dead:
            self._plan(self._consumer_inputs(example_input))

    @staticmethod
    def _all_zero(g: ChannelGroup) -> Tensor:
        norm = torch.zeros(g.channels)
        for s in g.slices:
            if s.producer and s.attr == "weight" and isinstance(s.module, _LAYERS):
                norm.index_add_(0, s.root, _per_index(s.tensor.detach().abs().float(), s).cpu())
        return norm == 0

    def _consumer_inputs(self, example_input: Any) -> dict[nn.Module, Tensor]:
        model = self.pruner.model
        consumers = {s.module for name in self.dead for g in self.pruner.groups if g.name == name
                     for s in g.slices if not s.producer and isinstance(s.module, _LAYERS)}
        seen: dict[nn.Module, Tensor] = {}

        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(module, args[0].detach())

        handles = [m.register_forward_pre_hook(record) for m in consumers]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                call_model(model, example_input)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return seen

    def _plan(self, inputs: dict[nn.Module, Tensor]) -> None:
        for g in self.pruner.groups:
            dead = self.dead.get(g.name)
            if dead is None:
                continue
            consumers = [s for s in g.slices if not s.producer and isinstance(s.module, _LAYERS)]
            for channel in torch.nonzero(dead).flatten().tolist():
                folds = []  # every consumer of the channel must take its constant, or the channel stays
                for s in consumers:
                    why, fold = self._fold(s, s.index[s.root == channel], inputs.get(s.module))
                    if why is not None:
                        dead[channel] = False
                        self.kept[g.name] = why
                        break
                    if fold is not None:
                        folds.append(fold)
                else:
                    self._folds.extend(folds)
            if dead.all():  # a layer keeps at least one channel
                dead[0] = False
                self.kept.setdefault(g.name, "every channel is dead; one is kept so the layer has an output")

    def _fold(self, s: _Slice, positions: Tensor, x: Tensor | None) -> tuple[str | None, Any]:
        """How the channel's constant (read at ``positions`` of the consumer's input) folds into the consumer's
        bias: ``(None, (consumer, increment))``, ``(None, None)`` for a zero constant, or ``(why not, None)``."""
        if x is None:
            return "its consumer did not run on the example input", None
        module = s.module
        conv = isinstance(module, nn.modules.conv._ConvNd)
        values = x.index_select(1 if conv else x.dim() - 1, positions.to(x.device)).float()
        if conv:
            values = values.movedim(1, -1)
        values = values.reshape(-1, positions.numel())
        c = values[0]
        if bool(((values - c).abs() > self.atol * (1 + c.abs())).any()):
            return "its value varies with the input (a live branch adds to it)", None
        if bool((c == 0).all()):
            return None, None
        bias = getattr(module, "bias", None)
        if bias is None:
            return "it outputs a nonzero constant into a layer without a bias", None
        w = s.tensor.detach()
        if isinstance(module, QuantizedLayer) and module.fake_quant_enabled:  # fold what the layer computes with
            w = module.weight_quantizers[s.attr](w) if s.attr in module.weight_quantizers else w
            quantizer = module.input_quantizers.get("input")
            c = c if quantizer is None else quantizer(c.to(w.dtype), False).float()
        w = w.float()
        if conv:
            padding = getattr(module, "padding", 0)
            if module.transposed or (padding != "valid" and any(int(p) for p in (
                    padding if isinstance(padding, tuple) else (padding,)))):
                return "it outputs a nonzero constant into a padded or transposed convolution", None
            cols = w.index_select(1, positions.to(w.device))
            increment = (cols * c.to(w.device).reshape(1, -1, *([1] * (w.dim() - 2)))).sum(
                dim=tuple(range(1, w.dim())))
        elif isinstance(module, HFConv1D):
            increment = c.to(w.device) @ w.index_select(0, positions.to(w.device))
        else:
            increment = w.index_select(1, positions.to(w.device)) @ c.to(w.device)
        return None, (module, increment)

    def check(self, inputs: Sequence[Any] = ()) -> str | None:
        """Remove the dead channels from a copy of the model and check that the copy computes what the model
        computes on ``example_input`` and on each of ``inputs`` (a constant read on one input may vary on others);
        returns what differs, or ``None``."""
        if not self._folds and not self.dead:
            return None
        model = throwaway_copy(self.pruner.model)
        pruner = ChannelPruner(model, self.example_input, self.pruner.layers, 0.0, verify=False)
        names = {g.name for g in self.pruner.groups}
        pruner.groups = [g for g in pruner.groups if g.name in names]  # the groups that passed the dry run
        twin = DeadChannels(pruner, self.example_input, self.atol)
        return check_removal(model, [self.example_input, *inputs], {}, {}, twin.remove)

    @torch.no_grad()
    def remove(self) -> dict[str, tuple[int, int]]:
        """Fold the dead channels' constants into their consumers' biases and remove the channels; returns
        ``{group: (channels before, after)}`` for the groups that lost channels."""
        for module, increment in self._folds:
            bias = module.bias
            assert isinstance(bias, Tensor)
            bias.add_(increment.to(bias.dtype).to(bias.device))
        self._folds = []
        for g in self.pruner.groups:
            dead = self.dead.get(g.name)
            g.mask = None if dead is None or not dead.any() else ~dead
        return self.pruner.remove()


def _per_index(value: Tensor, s: _Slice) -> Tensor:
    """``value`` summed over every dimension but ``s.dim``, at the positions ``s.index``."""
    dims = [d for d in range(value.dim()) if d != s.dim]
    total = value.sum(dim=dims) if dims else value
    return total[s.index.to(total.device)]
