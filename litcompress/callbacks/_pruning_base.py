"""What `Pruning` and `ChannelPruning` share: the arguments of the schedule and the selection, the mask updates on
the clock, enforcement after every optimizer step, gradient scores, logging and checkpoint state."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from litcompress._validation import fail
from litcompress.callbacks._base import (
    _check_common,
    _check_sharding,
    _compression_target,
    _CompressionCallback,
    _warn_inexact_resume,
    _Window,
)
from litcompress.callbacks._inputs import model_inputs
from litcompress.schedules import Schedule, get_schedule
from litcompress.selection import ParameterFilter, ParameterRef
from litcompress.sparsity.importance import DATA_DEPENDENT
from litcompress.sparsity.protocol import MaskPruner

__all__: list[str] = []

_CHECKED_BATCHES = 4  # the last training batches a removal of channels is checked on


class _PruningBase(_CompressionCallback):
    """Masks recomputed at the schedule's update points and enforced after every optimizer step; subclasses build
    the pruner (``self.pruner``) and decide what happens to the model at the end."""

    sparsity: Any  # the final target, set by each subclass

    def __init__(
        self,
        *,
        schedule: str | Schedule,
        start: int,
        end: int | None,
        interval: Literal["epoch", "step"],
        frequency: int | None,
        importance: Any,
        parameters: str | Sequence[str] | ParameterFilter | None,
        exclude: str | Sequence[str],
        log_prefix: str,
        verbose: bool,
        example_input: Any,
    ) -> None:
        super().__init__(interval)
        self._check_window(start, end, frequency)
        self.schedule = get_schedule(schedule)
        _check_common(parameters, exclude, verbose, log_prefix)
        self.start, self.end, self.frequency = start, end, frequency
        self.importance = importance
        self.parameters, self.exclude = parameters, exclude
        self.log_prefix, self.verbose = log_prefix, verbose
        self.example_input = example_input
        self.pruner: MaskPruner | None = None
        self._window: _Window | None = None
        self._last_point: int | None = None
        # the inputs of the last training batches: a removal of channels is checked on them before it is trusted
        self._recent: deque[Any] = deque(maxlen=_CHECKED_BATCHES)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._training = False
        _check_sharding(trainer, pl_module, type(self).__name__, layers_before_sharding=self._traces())
        self._before_selection(trainer, pl_module)
        if next(_compression_target(pl_module).parameters(), None) is None:
            return  # layers are built in `configure_model` (after this hook): select in `on_fit_start`
        self._prepare(trainer, pl_module)

    def _traces(self) -> bool:
        """Whether the callback traces (or changes) layers, which must then exist before FSDP2 shards them."""
        return False

    def _before_selection(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called in ``setup`` before the selection (checks of the strategy, hooks on the module)."""

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the tensors and build what can be built before the fit starts."""
        raise NotImplementedError

    def _touched(self) -> set[int]:
        """The ids of every tensor this callback masks or slices: its selection and, when it removes channels, every
        tensor coupled to them (the next layers' inputs), whether or not it has traced them yet."""
        ids: set[int] = set()
        for pruner in self._pruners():
            ids |= {id(r.tensor) for r in pruner.refs}
            ids |= {id(s.tensor) for group in getattr(pruner, "groups", ()) for s in group.slices}
        return ids

    def _pruners(self) -> list[Any]:
        """Every pruner this callback holds now."""
        return [self.pruner] if self.pruner is not None else []

    def _removes(self) -> bool:
        """Whether channels will be removed (so the last batches' inputs are kept to check the removal on)."""
        return False

    def _ready(self) -> bool:
        return self.pruner is not None

    def _check_disjoint(self, trainer: pl.Trainer, mine: set[int]) -> None:
        for other in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
            if other is self or not isinstance(other, _PruningBase) or other.pruner is None:
                continue
            shared = [r.name for r in other.pruner.refs if id(r.tensor) in mine]
            if shared:
                fail("parameters", f"disjoint selections for {type(self).__name__} and {type(other).__name__}",
                     shared, hint="use `exclude` so each tensor is pruned by one callback")

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
        # said whatever `verbose` is: a decision about the selection, made once, not progress
        rank_zero_info(f"{type(self).__name__}: left out {len(frozen)} frozen tensor(s) (requires_grad=False): "
                       + ", ".join(frozen[:8]) + (", ..." if len(frozen) > 8 else ""))
        return kept

    def _start_enforcing(self, trainer: pl.Trainer) -> None:
        """The pruner follows the parameters' layout and devices, masks are applied now and after every optimizer
        step, whoever calls it (automatic or manual optimization)."""
        pruner = self.pruner
        assert pruner is not None
        pruner.follow_layout()  # FSDP2 sharded the parameters after `setup`
        pruner.to_tensor_devices()
        pruner.apply()
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
        _warn_inexact_resume(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._training = True
        if self._removes():
            self._recent.append(model_inputs(batch, pl_module))
        self._maybe_update(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_update(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._recent.clear()

    def _before_update(self, point: int, value: float) -> None:
        """Called before the masks move to ``value`` at ``point`` (rewinding takes its snapshot here)."""

    def _after_update(self, value: float) -> None:
        """Called after the masks moved to ``value``."""

    def _maybe_update(self, trainer: pl.Trainer) -> None:
        window, pruner = self._window, self.pruner
        if pruner is None:
            return  # the channels were removed
        assert window is not None
        point = window.latest_point(trainer.global_step)
        if point is None or (self._last_point is not None and point <= self._last_point):
            return
        value = window.value(point)
        self._before_update(point, value)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if pruner.data_dependent else None
        per_part = pruner.update(value, reduce=reduce)
        self._after_update(value)
        self._last_point = point
        overall = pruner.global_sparsity()
        metrics = {f"{self.log_prefix}/sparsity": overall}
        metrics.update({f"{self.log_prefix}/sparsity/{name}": value for name, value in per_part.items()})
        self._log(trainer, metrics)
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: step {trainer.global_step}, sparsity {overall:.4f} "
                           f"over {len(per_part)} {self._parts}")

    _parts = "tensors"

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_point": self._last_point}
        if self.pruner is not None:
            state["pruner"] = self.pruner.state_dict()
        return state

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self.pruner is not None
        self.pruner.load_state_dict(state.get("pruner", {}))
        self._last_point = state.get("last_point")
