"""`Pruning`: scheduled unstructured and N:M sparsity inside ``Trainer.fit``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override

from litcompress._validation import check_bool, check_choice, check_int, fail
from litcompress.callbacks._base import _compression_target
from litcompress.callbacks._channels import build_channel_pruner, remove_dead_channels, smaller_copy
from litcompress.callbacks._pruning_args import check_importance, resolve_sparsity
from litcompress.callbacks._pruning_base import _PruningBase
from litcompress.distributed import check_synced
from litcompress.schedules import Schedule
from litcompress.selection import ParameterFilter, select_parameters
from litcompress.sparsity.channels import ChannelPruner
from litcompress.sparsity.importance import ImportanceFn
from litcompress.sparsity.pruner import Pruner, Scope, default_scope

__all__ = ["Pruning"]


class Pruning(_PruningBase):
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
        pattern: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"`` (at most N nonzeros in every M consecutive
            weights along the input dimension). Whole channels and attention heads, removed so the model gets
            smaller: :class:`~litcompress.callbacks.ChannelPruning`.
        importance: ``"magnitude"``, ``"movement"`` (accumulated ``-w * grad``), ``"taylor"`` (``|w * grad|``
            since the last update), ``"random"``, or a callable ``fn(name, weight) -> scores`` (higher kept).
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
        verbose: log a line at every mask update (rank zero, INFO). Off by default, as in Lightning's
            ``ModelPruning``: the sparsity is logged as metrics either way.
        example_input: the batch traced to find dead channels when ``remove_channels=True`` (a tensor, a tuple of
            positional inputs or a mapping of keyword inputs). ``None``: the module's ``example_input_array``, else
            the first training batch.
        remove_channels: when training ends, delete the dead channels, whose weights pruning zeroed entirely, their
            constant output folded into the next layer's bias (:class:`~litcompress.sparsity.dead.DeadChannels`;
            traced at fit start, so a model that cannot be is an error before the first step; needs ``pip install
            "litcompress[structured]"``). The removal happens after the last checkpoint of the fit is written:
            checkpoints hold the full-size model and the masks, so ``fit(ckpt_path=...)`` resumes. The smaller
            model's outputs equal the masked model's within float tolerance. Under FSDP2 (``ModelParallelStrategy``)
            shards cannot shrink: the sharded model keeps its size, and rank zero gets the smaller copy as
            :attr:`smaller_model`.

    The tensors are looked up in ``pl_module.compression_target`` when the LightningModule defines it (a
    :class:`~litcompress.modules.DistillationModule` points it at the student), otherwise in the whole module.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model = BoringModel()  # one Linear(32, 2) layer, 64 steps per epoch on random data
        >>> pruning = Pruning(0.75, schedule="cubic", start=1)  # epochs 1..3
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
        verbose: bool = False,
        example_input: Any = None,
        remove_channels: bool = False,
    ) -> None:
        super().__init__(schedule=schedule, start=start, end=end, interval=interval, frequency=frequency,
                         importance=importance, parameters=parameters, exclude=exclude, log_prefix=log_prefix,
                         verbose=verbose, example_input=example_input)
        if scope is not None:
            check_choice("scope", scope, ("layer", "global"))
        check_bool("remove_channels", remove_channels)
        sparsity = resolve_sparsity(sparsity, pattern, scope)
        check_importance(importance, start, self.schedule)
        check_bool("rewind", rewind)
        if rewind and self.schedule(0.0) >= 1.0:
            fail("rewind", "False with a schedule that reaches its final value at `start`", rewind,
                  hint="rewinding to the weights at `start` right after pruning there changes nothing; "
                  "use a gradual schedule (linear, cubic, exponential)")
        check_int("seed", seed)
        self.sparsity = sparsity
        self.scope: Scope = default_scope(sparsity, pattern) if scope is None else scope
        self.pattern = pattern
        self.rewind, self.seed = rewind, seed
        self.remove_channels = remove_channels
        self._dead: tuple[ChannelPruner, Any] | None = None  # remove_channels: traced at fit start
        self.removed: dict[str, tuple[int, int]] = {}  # dead channel groups removed at the end of the fit
        self.smaller_model: nn.Module | None = None  # FSDP2: rank zero's smaller copy (the sharded model stays)
        self.pruner: Pruner | None = None

    def _key_fields(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "pattern": self.pattern, "parameters": self.parameters,
                "exclude": self.exclude}

    def _traces(self) -> bool:
        return self.remove_channels

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refs = self._trainable(select_parameters(_compression_target(pl_module), self.parameters, self.exclude))
        pruner = self.pruner
        if not isinstance(pruner, Pruner) or [id(r.tensor) for r in pruner.refs] != [
            id(r.tensor) for r in refs if r.name in pruner.targets
        ]:  # a new model; the same model fitted again keeps its masks
            pruner = self.pruner = Pruner(refs, self.sparsity, self.scope, self.pattern, self.importance, self.seed)
            self._last_point = None
        self._check_disjoint(trainer, {id(r.tensor) for r in pruner.refs})
        if self.remove_channels and self._dead is None and isinstance(trainer.strategy, ModelParallelStrategy):
            self._dead = build_channel_pruner(self, trainer, pl_module, pruner.refs, dead=True)  # the whole model
        self._apply_pending_state()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_synced(pl_module)
        if self.pruner is None:
            self._prepare(trainer, pl_module)
        assert self.pruner is not None
        if self.remove_channels and self._dead is None:  # traced now: an untraceable model fails before step 0
            self._dead = build_channel_pruner(self, trainer, pl_module, self.pruner.refs, dead=True)
        self._start_enforcing(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dead is None:
            return
        self._remove_hooks()
        if self.pruner is not None and self.pruner.shards is not None:  # FSDP2: on rank zero's copy
            self.removed, self.smaller_model = smaller_copy(self, *self._dead, dead=True, inputs=list(self._recent))
        else:
            self.removed = remove_dead_channels(self, *self._dead, inputs=list(self._recent))
        self._dead, self.pruner = None, None

    def _pruners(self) -> list[Any]:
        return super()._pruners() + ([self._dead[0]] if self._dead is not None else [])  # the dead-channel tracer

    def _removes(self) -> bool:
        return self._dead is not None

    def _before_update(self, point: int, value: float) -> None:
        if self.rewind and self.pruner is not None and self._window is not None and point == self._window.start:
            self.pruner.take_snapshot()

    def _after_update(self, value: float) -> None:
        if self.rewind and self.pruner is not None and value >= 1.0 and self.pruner.snapshot:
            self.pruner.rewind()
            self.pruner.snapshot = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.pruner is None and self.removed:
            state["removed"] = dict(self.removed)
        return state
