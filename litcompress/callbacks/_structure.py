"""What every callback that changes a model's structure during a fit shares (channels removed, layers factorized):

- a fit resumed from a checkpoint written after the change loads into the changed structure: the model is
  reshaped to the checkpoint's shapes (:func:`~litcompress.structure.match_structure_`) just before Lightning loads
  its weights, through a ``load_state_dict`` pre-hook held while the callback is attached;
- a change in the middle of a fit points the optimizers at the new parameters, carrying their state;
- a mid-fit change needs the model unwrapped (one process, one device): refused before the first step otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from litcompress._validation import fail
from litcompress.structure import Carry, match_structure_, replace_parameters

__all__ = ["StructureFollower", "check_mid_fit", "point_optimizers"]


class StructureFollower:
    """Reshapes the LightningModule to a checkpoint's shapes whenever a ``state_dict`` is loaded into it."""

    def __init__(self) -> None:
        self._handle: Any = None

    def attach(self, pl_module: nn.Module) -> None:
        self.detach()

        def hook(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
            match_structure_(module, state_dict, prefix)

        self._handle = pl_module.register_load_state_dict_pre_hook(hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def check_mid_fit(trainer: pl.Trainer, who: str, name: str, value: Any,
                  instead: str = "0 (before the first step)") -> None:
    """A structure change after the optimizers exist needs the model as the optimizers see it: one device, no
    wrapper (DDP's reducer and FSDP's shards hold the old parameters). ``instead``: the value that asks for no
    mid-fit change."""
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        fail(name, f"{instead} under {type(trainer.strategy).__name__}", value,
             hint=f"{who} changes the model's structure mid-fit only on a single device for now; change it before "
                  "training starts, or at the end of the fit")


def point_optimizers(trainer: pl.Trainer, who: str,
                     replacements: Mapping[nn.Parameter, Sequence[tuple[nn.Parameter, Carry | None]]]) -> None:
    """Point every optimizer of the fit at the new parameters (state carried); the LR schedulers keep theirs."""
    trainable = [p for p in replacements if p.requires_grad]
    found = replace_parameters(trainer.optimizers, replacements)
    if trainable and not found:
        fail("optimizers", "optimizers holding the parameters that changed", f"{len(trainable)} tensors not found",
             hint=f"{who} replaced parameters no optimizer held; `configure_optimizers` must optimize the model's "
                  "parameters (`self.parameters()`)")
