"""Plumbing shared by every litcompress callback, written once.

- one clock: ``start``/``end``/``frequency`` (and any other point of a schedule) are given in ``"epoch"`` units
  by default, or in optimizer steps with ``interval="step"``, and converted to optimizer steps in one place, so
  every schedule runs on ``trainer.global_step``; a point the fit never reaches is an error before the first step;
- the schedule window: which update point is due at a step, and the schedule's value there;
- the model a callback compresses (``pl_module.compression_target`` when a module defines it, e.g. the
  student of a :class:`~litcompress.modules.DistillationModule`);
- logging through every Lightning logger at the current step, on rank zero;
- optimizer hook handles that are removed when the fit ends, so repeated fits leak nothing.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from litcompress._validation import check_bool, check_choice, check_int, check_nonempty_str, fail
from litcompress.callbacks._sharded_state import load_sharded, save_sharded
from litcompress.schedules import Schedule, latest_update, progress
from litcompress.selection import check_patterns

__all__: list[str] = []

DEFAULT_END = 0.75
"""Where a schedule reaches its final value when ``end=None``: this fraction of the fit's optimizer steps, so the rest
of the fit recovers at the final value."""
DEFAULT_EVERY = 100
"""Default update spacing of a schedule, in optimizer steps, when an epoch is longer than this."""


def _compression_target(pl_module: nn.Module) -> nn.Module:
    target = getattr(pl_module, "compression_target", None)
    return target if isinstance(target, nn.Module) else pl_module


def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at the current step (loggers write on rank zero only)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _stable(value: Any) -> Any:
    """A representation that is the same in every process and run (callables by qualified name, not address)."""
    if callable(value) and not isinstance(value, type):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    return value


_WARNED_RESUME: weakref.WeakSet[Any] = weakref.WeakSet()


def _warn_inexact_resume(trainer: pl.Trainer) -> None:
    """Warn when a fit resumed from a mid-epoch checkpoint cannot continue exactly where it stopped.

    Compression state (masks, scores, quantizer ranges, schedule points) is restored exactly; the data order is
    not when the train dataloader cannot restore its position. Lightning warns about this for loaders with a
    length; this covers those without one, where it says nothing.
    """
    loop = trainer.fit_loop
    if (not getattr(loop, "restarted_mid_epoch", False) or trainer.num_training_batches != float("inf")
            or loop in _WARNED_RESUME):
        return
    _WARNED_RESUME.add(loop)  # once per fit, however many litcompress callbacks ask
    combined = loop._combined_loader
    loaders = combined.flattened if combined is not None else []
    if all(callable(getattr(x, "state_dict", None)) and callable(getattr(x, "load_state_dict", None))
           for x in loaders):
        return
    pl.utilities.rank_zero_warn(
        "litcompress: this fit resumes from a checkpoint written in the middle of an epoch, and the train "
        "dataloader cannot restore its position: the rest of the epoch sees other batches than an uninterrupted "
        "fit, so the result will differ (compression state itself is restored exactly). To make it exact, give "
        "the loader `state_dict()` / `load_state_dict()` (Lightning restores them), or resume from end-of-epoch "
        "checkpoints."
    )


def _check_common(parameters: Any, exclude: Any, verbose: Any, log_prefix: Any = "") -> None:
    """The arguments every compression callback takes: a selection (``parameters``: regexes or a callable, ``None``
    for the default; ``exclude``: regexes), ``verbose`` and, where it logs metrics, ``log_prefix``."""
    if parameters is not None and not callable(parameters):
        check_patterns("parameters", parameters)
    check_patterns("exclude", exclude)
    check_bool("verbose", verbose)
    if log_prefix != "":
        check_nonempty_str("log_prefix", log_prefix)


def _check_sharding(trainer: pl.Trainer, pl_module: nn.Module, who: str, layers_before_sharding: bool = False) -> None:
    """What a sharded fit supports, checked in ``setup`` (before any step).

    FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``) shards each parameter as a ``DTensor``:
    supported. FSDP1 (``FSDPStrategy``) flattens parameters into per-process slices that no mask or scale can be laid
    over: refused. ``layers_before_sharding``: the callback changes (or traces) layers, so they must exist before
    ``configure_model`` shards them.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        fail("strategy", "ModelParallelStrategy (FSDP2) for a sharded fit", type(strategy).__name__,
             hint=f"{who} works on FSDP2's per-parameter DTensor shards; FSDPStrategy's flattened parameters are "
                  "not supported: use ModelParallelStrategy and apply torch.distributed.fsdp.fully_shard in "
                  "configure_model")
    if not isinstance(strategy, ModelParallelStrategy):
        return
    if layers_before_sharding and next(_compression_target(pl_module).parameters(), None) is None:
        fail("model", "layers built in the LightningModule's __init__ under ModelParallelStrategy",
             "layers built in configure_model",
             hint=f"{who} replaces or traces layers, which must happen before configure_model shards them: build "
                  "the layers in __init__ and only apply fully_shard in configure_model")


class _Window:
    """Update points ``start, start + every, ...`` and ``end`` (all in optimizer steps)."""

    def __init__(self, start: int, end: int, every: int, schedule: Schedule) -> None:
        self.start, self.end, self.every, self.schedule = start, end, every, schedule

    def latest_point(self, step: int) -> int | None:
        """The last update point at or before ``step`` (``None`` before ``start``)."""
        return latest_update(step, self.start, self.end, self.every)

    def value(self, point: int) -> float:
        return float(self.schedule(progress(point, self.start, self.end)))


class _CompressionCallback(Callback):
    """Base of the litcompress callbacks (private: the public API is the subclasses)."""

    def __init__(self, interval: str) -> None:
        check_choice("interval", interval, ("step", "epoch"))
        self.interval = interval
        self._hook_handles: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._state_key: str | None = None
        self._training = False  # a training batch of the current fit has started (set by the subclasses)
        self._checkpoint_source: tuple[Any, nn.Module] | None = None

    # ------------------------------------------------------------------ checkpoint state
    def _key_fields(self) -> dict[str, Any]:
        """What tells two instances apart in one checkpoint (subclasses name their defining arguments)."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        # cached: Lightning formats it into a profiler label on every hook call, ~20 times per step
        if self._state_key is None:
            self._state_key = self._generate_state_key(**{k: _stable(v) for k, v in self._key_fields().items()})
        return self._state_key

    def _ready(self) -> bool:
        """Whether the model's tensors are known, so that saved state can be applied."""
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # state on FSDP2 shards goes where the weights' shards go (rank zero alone writes callback state)
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            states[self.state_key] = save_sharded(self.state_key, states[self.state_key], checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpoint_source = (trainer.ckpt_path, pl_module)  # where sharded state is read from

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = load_sharded(state_dict, *(self._checkpoint_source or (None, None)))
        if self._ready():
            self._load(state_dict)
        else:  # restored before `setup` found the tensors (or outside a fit): applied by `_apply_pending_state`
            self._pending_state = dict(state_dict)

    def _apply_pending_state(self) -> None:
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    @staticmethod
    def _check_window(start: Any, end: Any, frequency: Any) -> None:
        check_int("start", start, minimum=0)
        check_int("end", end, minimum=1, allow_none=True)
        check_int("frequency", frequency, minimum=1, allow_none=True)
        if end is not None and end <= start:
            fail("end", f"greater than `start` ({start}) or None (the last optimizer step of the fit)", end)

    # ------------------------------------------------------------------ the clock: one conversion to steps
    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
        """Optimizer steps in one epoch (``None`` when the train dataloader has no length)."""
        batches = trainer.num_training_batches
        if batches == float("inf"):
            return None
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def _steps_per_interval(self, trainer: pl.Trainer) -> int:
        if self.interval == "step":
            return 1
        per_epoch = self._steps_per_epoch(trainer)
        if per_epoch is None:
            fail("interval", "'step' for a train dataloader without a length", self.interval,
                 hint="an epoch has no known number of optimizer steps here; give start/end in steps")
        return per_epoch

    def _to_steps(self, trainer: pl.Trainer, value: int | None) -> int | None:
        """``value`` (in ``interval`` units) as an optimizer step; the one place units are converted."""
        return None if value is None else value * self._steps_per_interval(trainer)

    @staticmethod
    def _fit_steps(trainer: pl.Trainer) -> float:
        """The optimizer steps of this fit; infinity when unknown (Lightning reports ``max_steps``, -1 by default,
        for a train dataloader without a length)."""
        total = trainer.estimated_stepping_batches
        return float("inf") if total == float("inf") or total < 0 else total

    def _total_steps(self, trainer: pl.Trainer, name: str, value: int | None) -> int:
        total = self._fit_steps(trainer)
        if total == float("inf"):
            fail(name, "an int when training has no known length", value,
                 hint="set `max_steps` or `max_epochs` on the Trainer, or give every point of the schedule")
        return int(total)

    def _check_before_end(self, trainer: pl.Trainer, name: str, value: int) -> int:
        """``value`` in steps; an error (before the first step) when the fit ends before it is reached."""
        step = value * self._steps_per_interval(trainer)
        total = self._fit_steps(trainer)
        if total != float("inf") and step >= total:
            fail(name, f"before the last optimizer step of the fit ({int(total)})", value,
                 hint=f"{value} {self.interval}(s) is optimizer step {step}, which this fit never reaches: lower "
                      f"`{name}` or train longer")
        return step

    def _make_window(
        self, trainer: pl.Trainer, start: int, end: int | None, frequency: int | None, schedule: Schedule
    ) -> _Window:
        """The schedule window in optimizer steps. ``end=None``: :data:`DEFAULT_END` of the fit. ``frequency=None``:
        an update every epoch, or every :data:`DEFAULT_EVERY` optimizer steps when an epoch is longer."""
        start_step = self._check_before_end(trainer, "start", start)
        if end is None:
            total = self._total_steps(trainer, "end", end)
            end_step = round(DEFAULT_END * total)
            if end_step <= start_step:
                end_step = total
                pl.utilities.rank_zero_warn(
                    f"{type(self).__name__}: `start` (step {start_step}) is past {DEFAULT_END:.0%} of the fit, where "
                    f"`end=None` puts the final value; it is reached at the last optimizer step ({total}) instead, "
                    "with no steps left to recover. Pass `end` to choose."
                )
        else:
            end_step = end * self._steps_per_interval(trainer)
            if end_step > self._fit_steps(trainer):
                pl.utilities.rank_zero_warn(
                    f"{type(self).__name__}: `end` ({end} {self.interval}s = step {end_step}) is after the last "
                    f"optimizer step of this fit ({self._fit_steps(trainer)}); the final value is "
                    "only reached if training continues."
                )
        if frequency is not None:
            every = frequency * self._steps_per_interval(trainer)
        else:
            every = min(DEFAULT_EVERY, self._steps_per_epoch(trainer) or DEFAULT_EVERY)
        return _Window(start_step, end_step, every, schedule)

    _log = staticmethod(_log_metrics)

    # ------------------------------------------------------------------ all or nothing
    def _undo(self, pl_module: pl.LightningModule) -> None:
        """Restore what this callback changed in the model during this fit's setup (nothing, by default)."""

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a fit that fails before its first training batch (in any callback's setup, or a check at train start)
        # leaves the model as it was given; a failure later keeps the training state for inspection
        self._remove_hooks()
        if not self._training:
            self._undo(pl_module)

    def _hook_optimizers(self, trainer: pl.Trainer, post: Callable[..., Any]) -> None:
        """Run ``post`` after every ``optimizer.step()`` of this fit (automatic or manual optimization)."""
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(post))

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
