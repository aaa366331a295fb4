"""`Pruning`: scheduled sparsity inside ``Trainer.fit``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from litcompress._validation import check_bool, check_choice, check_int, check_nonempty_str, fail
from litcompress.callbacks._base import (
    _check_sharding,
    _compression_target,
    _CompressionCallback,
    _warn_inexact_resume,
    _Window,
)
from litcompress.callbacks._channels import (
    build_channel_pruner,
    check_remove_at,
    remove_channels,
    remove_channels_mid_fit,
    remove_dead_channels,
    smaller_copy,
)
from litcompress.callbacks._pruning_args import check_importance, resolve_sparsity
from litcompress.callbacks._structure import StructureFollower, check_mid_fit
from litcompress.distributed import check_synced
from litcompress.schedules import Schedule, get_schedule
from litcompress.selection import ParameterFilter, ParameterRef, check_patterns, select_parameters
from litcompress.sparsity.channels import ChannelPruner
from litcompress.sparsity.importance import DATA_DEPENDENT, ImportanceFn
from litcompress.sparsity.pruner import Pruner, Scope, default_scope

log = logging.getLogger(__name__)

__all__ = ["Pruning"]


class Pruning(_CompressionCallback):
    r"""Prune weights to a target sparsity on a schedule, inside an ordinary ``Trainer.fit``.

    Masks are recomputed at update points (``start``, every ``frequency`` intervals, and ``end``) to
    ``schedule(progress)`` of the final target, and pruned weights are zeroed after every optimizer step, so
    they are exactly zero whenever the model is used and stay zero (gradients and optimizer momentum cannot
    revive them). The target is absolute, never compounding: at ``end`` every pruned tensor holds exactly its
    target fraction of zeros (to one element), whatever the number of epochs, accumulation or resumes.

    The masks (``torch.bool``, one byte per weight) live in this callback and in its checkpoint state, not in
    the model: the model's ``state_dict`` keys never change, and ``fit(ckpt_path=...)`` resumes mid-schedule
    to the same result as an uninterrupted fit.

    Args:
        sparsity: final fraction of zeros in ``[0, 1)``, or a mapping from name regexes to per-tensor targets
            (first match wins; selected tensors matched by no key stay dense). Optional with an ``N:M``
            ``pattern``, whose sparsity is ``1 - N/M``.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"`` (Zhu & Gupta 2017), ``"exponential"``, or a callable
            mapping progress in [0, 1] to the fraction of the final sparsity (see :mod:`litcompress.schedules`).
        start: first update point, in ``interval`` units (epochs by default); it must fall inside the fit.
        end: last update point (the target is reached there). ``None`` (default): three quarters of the way
            through the fit, so the last quarter trains at the final sparsity and recovers (reaching the target at
            the very last step cost LeNet-300-100 half a point more; see ``benchmarks/RESULTS.md``).
        interval: the unit of ``start``, ``end`` and ``frequency``: ``"epoch"`` (default, as in every litcompress
            callback and in Lightning's own) or ``"step"`` (optimizer steps). Either way masks are updated on
            ``trainer.global_step``, never waiting for an epoch to end.
        frequency: masks are recomputed every ``frequency`` intervals between ``start`` and ``end``; ``None``
            (default): every epoch, or every 100 optimizer steps when an epoch is longer.
        scope: ``"global"`` (one magnitude threshold over all tensors) or ``"layer"`` (each tensor to its target).
            ``None`` (default): ``"global"`` for one float sparsity (as Lightning's ``ModelPruning``); ``"layer"``
            for a per-tensor mapping or an ``N:M`` pattern. Per-layer targets prune a small output layer as hard
            as the rest; keep it dense then (``exclude=["<last>"]``).
        pattern: ``"unstructured"``, ``"N:M"`` such as ``"2:4"`` (at most N nonzeros in every M consecutive
            weights along the input dimension), or ``"channel"``: whole output channels of the selected Linear and
            Conv layers (neurons, filters) are masked together with everything coupled to them (BatchNorm, the
            next layers' inputs, residual partners; the graph comes from Torch-Pruning, ``pip install
            "litcompress[structured]"``), and whole heads of ``nn.MultiheadAttention`` layers, every layer losing
            ``sparsity`` of its channels or heads, removed at the end of the fit (see ``remove_channels``): the
            model ends smaller and faster, computing what the masked model computed. The model's output layers keep
            their channels; channels coupled to a layer that cannot shrink exactly (LayerNorm, grouped
            convolutions) are left alone with a warning.
        importance: ``"magnitude"``, ``"movement"`` (accumulated ``-w * grad``), ``"taylor"`` (``|w * grad|``
            since the last update), ``"random"``, or a callable ``fn(name, weight) -> scores`` (higher kept). With
            ``pattern="channel"``: ``"magnitude"`` (L2 norm of a channel over its group), ``"l1"``, ``"taylor"``,
            or ``"bn_scale"`` (``|gamma|`` of the channel's BatchNorm).
        parameters: which tensors. ``None``: the weights of Linear, Hugging Face's Conv1D (GPT-2's projections,
            N:M groups along their input dimension 0), Conv1d/2d/3d, LSTM/GRU/RNN and MultiheadAttention; a layer
            with a Linear's interface of another kind is an error naming it, never silently skipped. Regexes
            (``re.search`` on parameter names) or ``fn(module, name) -> bool`` select any parameter with 2 or more
            dimensions. A tied tensor is pruned once, in all its owners.
        exclude: regexes of names to keep dense; ``"<first>"`` / ``"<last>"`` name the first / last selected
            layer, so ``exclude=["<first>", "<last>"]`` keeps both ends of the network dense.
        rewind: lottery-ticket rewinding: when the schedule reaches its final value, the surviving weights are
            reset to their values at ``start`` and training continues from there.
        seed: seed of the ``"random"`` importance.
        log_prefix: prefix of the logged metrics ``<prefix>/sparsity`` and ``<prefix>/sparsity/<tensor>``.
        verbose: print a line at every mask update (rank zero).
        example_input: the batch traced to find coupled channels (a tensor, a tuple of positional inputs or a
            mapping of keyword inputs) when channels are removed. ``None``: the module's ``example_input_array``,
            else the first training batch.
        remove_channels: delete channels when training ends: with ``pattern="channel"`` (default ``True``) the
            masked ones; with an unstructured or N:M pattern (default ``False``) the dead ones, whose weights
            pruning zeroed entirely, their constant output folded into the next layer's bias
            (:class:`~litcompress.sparsity.dead.DeadChannels`; traced at fit start, so a model that cannot be is an
            error before the first step). The removal happens after the last checkpoint of the fit is written:
            checkpoints hold the full-size model and the masks, so ``fit(ckpt_path=...)`` resumes. The smaller
            model's outputs equal the masked model's within float tolerance. Under FSDP2 (``ModelParallelStrategy``)
            shards cannot shrink: the sharded model keeps its size, masked, and rank zero gets the smaller copy as
            :attr:`smaller_model`.
        remove_at: ``pattern="channel"`` only: remove the channels at this point (``interval`` units, at or after
            the schedule's ``end``) instead of at the end, and train the smaller model for the rest of the fit:
            the optimizers are edited in place to hold the smaller tensors, each keeping the kept slices of its
            state; the LR schedulers continue. A checkpoint written after it restores into the smaller structure
            with ``fit(ckpt_path=...)`` while this callback is attached (for inference in a fresh process:
            :func:`litcompress.structure.match_structure_` before ``load_state_dict``). Single device only.

    The tensors are looked up in ``pl_module.compression_target`` when the LightningModule defines it (a
    :class:`~litcompress.modules.DistillationModule` points it at the student), otherwise in the whole module.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model = BoringModel()  # one Linear(32, 2) layer, 64 steps per epoch on random data
        >>> pruning = Pruning(0.75, schedule="cubic", start=1, verbose=False)  # epochs 1..3
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model)
        >>> int((model.layer.weight == 0).sum()), model.layer.weight.numel()  # exactly 75% zeros
        (48, 64)
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] | None = None,
        *,
        schedule: str | Schedule = "cubic",
        start: int = 0,
        end: int | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        frequency: int | None = None,
        scope: Literal["layer", "global"] | None = None,
        pattern: str = "unstructured",
        importance: str | ImportanceFn = "magnitude",
        parameters: str | Sequence[str] | ParameterFilter | None = None,
        exclude: str | Sequence[str] = (),
        rewind: bool = False,
        seed: int = 0,
        log_prefix: str = "pruning",
        verbose: bool = True,
        example_input: Any = None,
        remove_channels: bool | None = None,
        remove_at: int | None = None,
    ) -> None:
        super().__init__(interval)
        self._check_window(start, end, frequency)
        self.schedule = get_schedule(schedule)
        if scope is not None:
            check_choice("scope", scope, ("layer", "global"))
        remove_channels = (pattern == "channel") if remove_channels is None else remove_channels
        check_bool("remove_channels", remove_channels)
        check_remove_at(remove_at, pattern, remove_channels, end)
        sparsity = resolve_sparsity(sparsity, pattern, scope, importance, rewind)
        check_importance(importance, pattern, start, self.schedule)
        if parameters is not None and not callable(parameters):
            check_patterns("parameters", parameters)
        check_patterns("exclude", exclude)
        check_bool("rewind", rewind)
        if rewind and self.schedule(0.0) >= 1.0:
            fail("rewind", "False with a schedule that reaches its final value at `start`", rewind,
                  hint="rewinding to the weights at `start` right after pruning there changes nothing; "
                  "use a gradual schedule (linear, cubic, exponential)")
        check_int("seed", seed)
        check_nonempty_str("log_prefix", log_prefix)
        check_bool("verbose", verbose)

        self.sparsity = sparsity
        self.start, self.end = start, end
        self.frequency = frequency
        self.scope: Scope = default_scope(sparsity, pattern) if scope is None else scope
        self.pattern, self.importance = pattern, importance
        self.parameters, self.exclude = parameters, exclude
        self.rewind, self.seed = rewind, seed
        self.log_prefix, self.verbose = log_prefix, verbose
        self.example_input, self.remove_channels, self.remove_at = example_input, remove_channels, remove_at
        self._remove_step: int | None = None
        self._dead: tuple[ChannelPruner, Any] | None = None  # unstructured + remove_channels: traced at fit start
        self._follower = StructureFollower()  # pattern="channel": checkpoints after a removal load into the new shape
        self.removed: dict[str, tuple[int, int]] = {}  # channel groups removed at the end of the fit
        self.smaller_model: nn.Module | None = None  # FSDP2: rank zero's smaller copy (the sharded model stays)
        self._channel_refs: list[ParameterRef] | None = None  # pattern="channel": selected in `setup`
        self._traced: Any = None  # FSDP2 + channels: the input traced in `setup`, before sharding

        self.pruner: Pruner | ChannelPruner | None = None
        self._window: _Window | None = None
        self._last_point: int | None = None

    def _key_fields(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": self.pattern, "parameters": self.parameters,
                "exclude": self.exclude}

    def _ready(self) -> bool:
        return self.pruner is not None

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._training = False
        _check_sharding(trainer, pl_module, type(self).__name__,
                        layers_before_sharding=self.pattern == "channel" or self.remove_channels)
        if self.pattern == "channel":
            self._follower.attach(pl_module)
            if self.remove_at is not None:
                check_mid_fit(trainer, type(self).__name__, "remove_at", self.remove_at)
        if next(_compression_target(pl_module).parameters(), None) is None:
            return  # layers are built in `configure_model` (after this hook): select in `on_fit_start`
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refs = self._trainable(select_parameters(_compression_target(pl_module), self.parameters, self.exclude))
        pruner = self.pruner
        if self.pattern == "channel":  # masks need the coupled-channel graph: traced on a batch in `on_fit_start`
            self._channel_refs = refs
            self._check_disjoint(trainer, {id(r.tensor) for r in refs})
            if isinstance(trainer.strategy, ModelParallelStrategy):  # traced now, on the whole model
                self.pruner, self._traced = build_channel_pruner(self, trainer, pl_module, refs)
            return
        if not isinstance(pruner, Pruner) or [id(r.tensor) for r in pruner.refs] != [
            id(r.tensor) for r in refs if r.name in pruner.targets
        ]:  # a new model; the same model fitted again keeps its masks
            assert self.sparsity is not None  # set in __init__ for every pattern
            pruner = self.pruner = Pruner(refs, self.sparsity, self.scope, self.pattern, self.importance, self.seed)
            self._last_point = None
        self._check_disjoint(trainer, {id(r.tensor) for r in pruner.refs})
        if self.remove_channels and self._dead is None and isinstance(trainer.strategy, ModelParallelStrategy):
            self._dead = build_channel_pruner(self, trainer, pl_module, pruner.refs, dead=True)  # the whole model
        self._apply_pending_state()

    def _check_disjoint(self, trainer: pl.Trainer, mine: set[int]) -> None:
        for other in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
            if other is self or not isinstance(other, Pruning) or other.pruner is None:
                continue
            shared = [r.name for r in other.pruner.refs if id(r.tensor) in mine]
            if shared:
                fail("parameters", "disjoint selections for two Pruning callbacks", shared,
                      hint="use `exclude` so each tensor is pruned by one callback")

    def _trainable(self, refs: list[ParameterRef]) -> list[ParameterRef]:
        """Frozen tensors (``requires_grad=False``) are left out of the default selection; selected by name, they
        are pruned by magnitude, but a gradient-based importance has no scores for them: an error."""
        frozen = [ref.name for ref in refs if not ref.tensor.requires_grad]
        if not frozen:
            return refs
        if self.parameters is not None:
            if self.importance in DATA_DEPENDENT:
                fail("parameters", f"trainable tensors with importance={self.importance!r}", frozen,
                      hint="these have requires_grad=False, so they get no gradient to score them: unfreeze them, "
                           "leave them out with `exclude`, or use importance='magnitude'")
            return refs
        kept = [ref for ref in refs if ref.tensor.requires_grad]
        if not kept:
            fail("model", "a model with trainable weights to prune", f"only frozen ones: {frozen}",
                  hint="unfreeze them (requires_grad=True) or name them with `parameters` to prune them by magnitude")
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: left out {len(frozen)} frozen tensor(s) (requires_grad=False): "
                           + ", ".join(frozen[:8]) + (", ..." if len(frozen) > 8 else ""))
        return kept

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_synced(pl_module)
        if self.pruner is None and self.pattern != "channel":
            self._prepare(trainer, pl_module)
        if self.pattern == "channel":
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
        elif self.remove_channels and self._dead is None:  # traced now: an untraceable model fails before step 0
            assert isinstance(self.pruner, Pruner)
            self._dead = build_channel_pruner(self, trainer, pl_module, self.pruner.refs, dead=True)
        assert self.pruner is not None
        self.pruner.follow_layout()  # FSDP2 sharded the parameters after `setup`
        self.pruner.to_tensor_devices()
        self.pruner.apply()
        pruner = self.pruner
        # enforcement after every optimizer step, whoever calls it (automatic or manual optimization)
        self._hook_optimizers(trainer, post=lambda *_: pruner.apply())

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # gradients are final here (after the closure's backward and AMP unscaling); a torch step pre-hook would
        # run before Lightning's closure and see the previous step's gradients
        if self.pruner is not None and self.pruner.data_dependent:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.pruner.accumulate(only=ids, skip_nonfinite=scaler is not None)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the first prune waits for the first batch: until then nothing is changed, so a failure in any callback's
        # setup leaves the model as it was
        self._window = self._make_window(trainer, self.start, self.end, self.frequency, self.schedule)
        if self.remove_at is not None and self.pruner is not None:
            self._remove_step = self._check_before_end(trainer, "remove_at", self.remove_at)
            if self._remove_step < self._window.end:
                fail("remove_at", f"at or after the schedule's end (optimizer step {self._window.end})",
                     self.remove_at, hint="channels are removed once their masks are final; raise `remove_at` "
                     "or pass an earlier `end`")
        _warn_inexact_resume(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pattern == "channel" and self.remove_channels and isinstance(self.pruner, ChannelPruner):
            self._remove_hooks()  # the optimizers point at the removed parameters
            if self.pruner.local is not None:  # FSDP2: shards cannot shrink; rank zero gets a smaller copy
                self.removed, self.smaller_model = smaller_copy(self, self.pruner, self._traced)
                self._traced = None  # spent with the masks: a later fit traces again
            else:
                self.removed = remove_channels(self, self.pruner)
            self.pruner = None
        elif self._dead is not None:
            self._remove_hooks()
            if isinstance(self.pruner, Pruner) and self.pruner.shards is not None:  # FSDP2: on rank zero's copy
                self.removed, self.smaller_model = smaller_copy(self, *self._dead, dead=True)
            else:
                self.removed = remove_dead_channels(self, *self._dead)
            self._dead, self.pruner = None, None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._follower.detach()

    # ------------------------------------------------------------------ schedule
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._training = True
        self._maybe_update(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_update(trainer)
        if (self._remove_step is not None and trainer.global_step >= self._remove_step
                and isinstance(self.pruner, ChannelPruner)):
            self._remove_hooks()  # the hooks hold the spent masks
            self.removed = remove_channels_mid_fit(self, trainer, self.pruner)
            self.pruner = None

    def _maybe_update(self, trainer: pl.Trainer) -> None:
        window, pruner = self._window, self.pruner
        if pruner is None:
            return  # the channels were removed
        assert window is not None
        point = window.latest_point(trainer.global_step)
        if point is None or (self._last_point is not None and point <= self._last_point):
            return
        value = window.value(point)
        rewind = pruner if self.rewind and isinstance(pruner, Pruner) else None  # never with channels
        if rewind is not None and point == window.start:
            rewind.take_snapshot()
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if pruner.data_dependent else None
        per_tensor = pruner.update(value, reduce=reduce)
        if rewind is not None and value >= 1.0 and rewind.snapshot:
            rewind.rewind()
            rewind.snapshot = {}
        self._last_point = point
        overall = pruner.global_sparsity()
        metrics = {f"{self.log_prefix}/sparsity": overall}
        metrics.update({f"{self.log_prefix}/sparsity/{name}": value for name, value in per_tensor.items()})
        self._log(trainer, metrics)
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: step {trainer.global_step}, sparsity {overall:.4f} "
                           f"over {len(per_tensor)} tensors")

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_point": self._last_point}
        if self.pruner is not None:
            state["pruner"] = self.pruner.state_dict()
        elif self.removed:
            state["removed"] = dict(self.removed)
        return state

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self.pruner is not None
        self.pruner.load_state_dict(state.get("pruner", {}))
        self._last_point = state.get("last_point")
