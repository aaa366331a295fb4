"""`ChannelPruning`: whole output channels and attention heads masked on a schedule, then removed, inside
``Trainer.fit``."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override

from litcompress._validation import check_bool, check_choice, check_fraction, check_int, fail
from litcompress.callbacks._base import _compression_target
from litcompress.callbacks._channels import build_channel_pruner, remove_channels, remove_channels_mid_fit, smaller_copy
from litcompress.callbacks._pruning_base import _PruningBase
from litcompress.callbacks._structure import StructureFollower, check_mid_fit
from litcompress.distributed import check_synced
from litcompress.schedules import Schedule
from litcompress.selection import ParameterFilter, ParameterRef, select_parameters
from litcompress.sparsity.channels import CHANNEL_IMPORTANCES, ChannelPruner

__all__ = ["ChannelPruning"]


class ChannelPruning(_PruningBase):
    r"""Prune whole output channels (neurons, filters) and attention heads on a schedule, then remove them: the
    model ends smaller and faster, computing what the masked model computed.

    Every selected Linear and Conv layer loses ``sparsity`` of its output channels, masked together with everything
    coupled to them (BatchNorm, the next layers' inputs, residual partners; the dependency graph comes from
    Torch-Pruning, ``pip install "litcompress[structured]"``), and every ``nn.MultiheadAttention`` layer and
    Hugging Face attention block (BERT, GPT-2, Llama-style, with grouped key/value heads) loses whole heads. The
    masks grow on the schedule like :class:`~litcompress.callbacks.Pruning`'s, are enforced after every optimizer
    step, and live in this callback's checkpoint state; at the end of the fit (or at ``remove_at``) the masked
    channels are deleted. The model's output layers keep their channels; channels coupled to a layer that cannot
    shrink exactly (LayerNorm, grouped convolutions, attention layouts litcompress does not know) are left alone
    with a warning naming the reason, decided before the first step.

    Args:
        sparsity: the fraction of output channels (or heads) removed from every selected layer, in ``[0, 1)``.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"`` (default), ``"exponential"``, or a callable mapping
            progress in [0, 1] to the fraction of the final sparsity (see :mod:`litcompress.schedules`).
        start: first update point, in ``interval`` units (epochs by default); it must fall inside the fit.
        end: last update point (the target is reached there). ``None`` (default): three quarters of the way
            through the fit, so the last quarter trains at the final sparsity.
        interval: the unit of ``start``, ``end``, ``frequency`` and ``remove_at``: ``"epoch"`` (default) or
            ``"step"`` (optimizer steps).
        frequency: masks are recomputed every ``frequency`` intervals between ``start`` and ``end``; ``None``
            (default): every epoch, or every 100 optimizer steps when an epoch is longer.
        importance: ``"magnitude"`` (L2 norm of a channel over its whole group), ``"l1"``, ``"taylor"``
            (accumulated ``|w * grad|``) or ``"bn_scale"`` (``|gamma|`` of the channel's BatchNorm).
        parameters: which layers, as in :class:`~litcompress.callbacks.Pruning` (regexes or
            ``fn(module, name) -> bool``); ``None``: every Linear, Conv, Hugging Face ``Conv1D`` and attention layer.
        exclude: regexes of names to leave whole; ``"<first>"`` / ``"<last>"`` name the first / last selected layer.
        example_input: the batch traced to find coupled channels: a tensor, a tuple of positional inputs or a
            mapping of keyword inputs. ``None``: the module's ``example_input_array``, else the first training batch.
            Tracing sees the path this input takes through the model.
        remove_channels: delete the masked channels (default ``True``); ``False`` keeps the model's size, masked.
            The removal happens after the last checkpoint of the fit is written: checkpoints hold the full-size
            model and the masks, so ``fit(ckpt_path=...)`` resumes. Under FSDP2 (``ModelParallelStrategy``) shards
            cannot shrink: the sharded model keeps its size, masked, and rank zero gets the smaller copy as
            :attr:`smaller_model`.
        remove_at: remove the channels at this point (``interval`` units, at or after the schedule's ``end``)
            instead of at the end of the fit, and train the smaller model for the rest of it: the optimizers are
            edited in place to hold the smaller tensors, each keeping the kept slices of its state; the LR
            schedulers continue. A checkpoint written after it restores into the smaller structure with
            ``fit(ckpt_path=...)`` while this callback is attached (for inference in a fresh process:
            :func:`litcompress.structure.match_structure_` before ``load_state_dict``). Single device only.
        log_prefix: prefix of the logged metrics ``<prefix>/sparsity`` and ``<prefix>/sparsity/<group>``.
        verbose: log a line at every mask update and at the removal (rank zero, INFO).

    After the fit, :attr:`removed` maps each channel group to its ``(channels before, channels after)``.

    Example:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> class Model(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> model = Model()
        >>> pruning = ChannelPruning(0.5, example_input=torch.randn(4, 32))
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model)
        >>> model.layer[0].out_features, model.layer[2].in_features  # 8 of 16 hidden neurons removed
        (8, 8)
    """

    _parts = "channel groups"

    def __init__(
        self,
        sparsity: float,
        *,
        schedule: str | Schedule = "cubic",
        start: int = 0,
        end: int | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        frequency: int | None = None,
        importance: str = "magnitude",
        parameters: str | Sequence[str] | ParameterFilter | None = None,
        exclude: str | Sequence[str] = (),
        example_input: Any = None,
        remove_channels: bool = True,
        remove_at: int | None = None,
        log_prefix: str = "pruning",
        verbose: bool = False,
    ) -> None:
        super().__init__(schedule=schedule, start=start, end=end, interval=interval, frequency=frequency,
                         importance=importance, parameters=parameters, exclude=exclude, log_prefix=log_prefix,
                         verbose=verbose, example_input=example_input)
        if isinstance(sparsity, (Mapping, bool)) or not isinstance(sparsity, numbers.Real):
            fail("sparsity", "a float in the [0, 1) range", sparsity, exc=TypeError,
                 hint="the fraction of output channels removed from every selected layer")
        check_fraction("sparsity", sparsity)
        check_choice("importance", importance, CHANNEL_IMPORTANCES,
                     hint="channel importances: L2 ('magnitude') or L1 norm, first-order Taylor, BatchNorm scale")
        check_bool("remove_channels", remove_channels)
        check_int("remove_at", remove_at, minimum=1, allow_none=True)
        if remove_at is not None and not remove_channels:
            fail("remove_at", "None with remove_channels=False", remove_at,
                 hint="pass remove_channels=True to remove them")
        if remove_at is not None and end is not None and remove_at < end:
            fail("remove_at", f"at or after `end` ({end}), when the masks are final", remove_at)
        self.sparsity = float(sparsity)
        self.remove_channels: bool = remove_channels
        self.remove_at: int | None = remove_at
        self._remove_step: int | None = None
        self._follower: StructureFollower = StructureFollower()  # checkpoints after a removal load into the new shape
        self.removed: dict[str, tuple[int, int]] = {}  # channel groups removed: (before, after)
        self.smaller_model: nn.Module | None = None  # FSDP2: rank zero's smaller copy (the sharded model stays)
        self._channel_refs: list[ParameterRef] | None = None  # selected in `setup`
        self._traced: Any = None  # FSDP2: the input traced in `setup`, before sharding
        self.pruner: ChannelPruner | None = None

    def _touched(self) -> set[int]:
        return super()._touched() | {id(r.tensor) for r in self._channel_refs or ()}  # selected, maybe not traced

    def _removes(self) -> bool:
        return self.remove_channels and self.pruner is not None

    def _key_fields(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": "channel", "parameters": self.parameters,
                "exclude": self.exclude}

    def _traces(self) -> bool:
        return True

    def _before_selection(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follower.attach(pl_module)
        if self.remove_at is not None:
            check_mid_fit(trainer, type(self).__name__, "remove_at", self.remove_at,
                          instead="None (the channels are removed at the end of the fit)")

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the layers; masks need the coupled-channel graph, traced on a batch in `on_fit_start` (under
        FSDP2 now, on the whole model, before it is sharded)."""
        refs = self._trainable(select_parameters(_compression_target(pl_module), self.parameters, self.exclude))
        self._channel_refs = refs
        self._check_disjoint(trainer, {id(r.tensor) for r in refs})
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self.pruner, self._traced = build_channel_pruner(self, trainer, pl_module, refs)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_synced(pl_module)
        if self._pending_state is not None and self._pending_state.get("removed"):
            self.removed, self._last_point = dict(self._pending_state["removed"]), None
            self._pending_state, self.pruner = None, None  # a checkpoint after the removal: nothing is left to do
            return
        if self._channel_refs is None:
            self._prepare(trainer, pl_module)
        assert self._channel_refs is not None  # set by `_prepare`
        if self._traced is None:
            self.pruner, _ = build_channel_pruner(self, trainer, pl_module, self._channel_refs)
        self._apply_pending_state()
        self._start_enforcing(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.remove_at is not None and self.pruner is not None:
            assert self._window is not None
            self._remove_step = self._check_before_end(trainer, "remove_at", self.remove_at)
            if self._remove_step < self._window.end:
                fail("remove_at", f"at or after the schedule's end (optimizer step {self._window.end})",
                     self.remove_at, hint="channels are removed once their masks are final; raise `remove_at` "
                     "or pass an earlier `end`")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._remove_step is not None and trainer.global_step >= self._remove_step and self.pruner is not None:
            self._remove_hooks()  # the hooks hold the spent masks
            self.removed = remove_channels_mid_fit(self, trainer, self.pruner, list(self._recent))
            self.pruner = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.remove_channels or self.pruner is None:
            return
        self._remove_hooks()  # the optimizers point at the removed parameters
        if self.pruner.local is not None:  # FSDP2: shards cannot shrink; rank zero gets a smaller copy
            self.removed, self.smaller_model = smaller_copy(self, self.pruner, self._traced, inputs=list(self._recent))
            self._traced = None  # spent with the masks: a later fit traces again
        else:
            self.removed = remove_channels(self, self.pruner, list(self._recent))
        self.pruner = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._follower.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.pruner is None and self.removed:
            state["removed"] = dict(self.removed)
        return state
