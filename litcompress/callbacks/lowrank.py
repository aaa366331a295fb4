"""`LowRankFactorization`: layers replaced by two thinner ones (truncated SVD) at a point of the fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from litcompress._validation import check_int, fail, fail_state
from litcompress.callbacks._base import _check_common, _check_sharding, _compression_target, _CompressionCallback
from litcompress.callbacks._pruning_base import _PruningBase
from litcompress.callbacks._structure import StructureFollower, check_mid_fit, point_optimizers
from litcompress.factorization.lowrank import (
    Factorized,
    LowRankResult,
    check_rank,
    check_rank_options,
    factorizable,
    factorize_,
    may_factorize,
    tied_to,
)
from litcompress.layers import HFConv1D
from litcompress.selection import ParameterFilter, select_parameters

__all__ = ["LowRankFactorization"]

_KINDS = (nn.Linear, HFConv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LowRankFactorization(_CompressionCallback):
    """Replace chosen layers by their truncated SVD at ``start``, then keep training the factorized model.

    Each selected Linear (or transformers ``Conv1D``, or ungrouped convolution) becomes a
    :class:`~litcompress.factorization.Factorized` pair, ``in -> r -> out``, initialised from the SVD, when that
    cuts its weights; a layer whose chosen rank would not is kept and reported. The rank is chosen per layer by
    exactly one of ``rank``, ``rank_ratio`` or ``energy``.

    At ``start=0`` the layers are factorized in ``setup``, before the optimizers exist. Later, they are factorized at
    that optimizer step and the optimizers are edited in place: the new factors join the param group of the
    weight they replace (fresh state), the bias is the same ``Parameter`` (its state kept), the LR schedulers
    continue. A checkpoint written after the change restores into the factorized structure with
    ``trainer.fit(ckpt_path=...)`` while this callback is attached; to load one for inference in a fresh
    process, build the model, call :func:`litcompress.structure.match_structure_` with the checkpoint's
    ``state_dict``, then ``load_state_dict``.

    With :class:`~litcompress.callbacks.Pruning` or :class:`~litcompress.callbacks.ChannelPruning` in the same fit,
    at ``start=0`` they prune the factors, in either order of the callbacks. A later ``start`` is refused before the
    first step when a pruner masks (or cuts the inputs of) a layer replaced then: masks cannot follow a weight into
    its factors. Keep such layers out of one of the two callbacks, or factorize at ``start=0``.

    Args:
        rank: the rank of every factorized layer (at most ``min(out, in)`` of each: an error otherwise).
        rank_ratio: the rank as a fraction of each layer's full rank, in ``(0, 1]``.
        energy: keep the smallest rank holding this fraction of the squared singular values, in ``(0, 1]``
            (relative squared reconstruction error ``<= 1 - energy``).
        start: when, in ``interval`` units (the word every callback uses for when it acts); ``0``: before
            training. Mid-fit changes run on a single device.
        interval: ``"epoch"`` (default) or ``"step"`` (optimizer steps).
        parameters: which layers, by weight-name regex (or ``fn(module, name)``), as for
            :class:`~litcompress.callbacks.Pruning`; default: every Linear, ``Conv1D`` and ungrouped convolution.
        exclude: weight names to leave dense (``"<first>"``, ``"<last>"`` for the ends of the network).
        log_prefix: prefix of the logged metrics (``lowrank/params``).
        verbose: print what was factorized (rank zero).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> model = BoringModel()  # one Linear(32, 2): 64 weights; at rank 1, 32 + 2
        >>> lowrank = LowRankFactorization(rank=1, start=1, verbose=False)  # after the first epoch
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[lowrank], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4)
        >>> trainer.fit(model)
        >>> type(model.layer).__name__, model.layer.rank, lowrank.results["layer"].params_after
        ('Factorized', 1, 34)
    """

    def __init__(
        self,
        rank: int | None = None,
        *,
        rank_ratio: float | None = None,
        energy: float | None = None,
        start: int = 0,
        interval: Literal["epoch", "step"] = "epoch",
        parameters: str | Sequence[str] | ParameterFilter | None = None,
        exclude: str | Sequence[str] = (),
        log_prefix: str = "lowrank",
        verbose: bool = True,
    ) -> None:
        super().__init__(interval)
        check_rank_options(rank, rank_ratio, energy)
        check_int("start", start, minimum=0)
        _check_common(parameters, exclude, verbose, log_prefix)
        self.rank, self.rank_ratio, self.energy = rank, rank_ratio, energy
        self.start, self.parameters, self.exclude = start, parameters, exclude
        self.log_prefix, self.verbose = log_prefix, verbose
        self.layers: list[str] = []  # selected in `setup`
        self.results: dict[str, LowRankResult] = {}  # per layer, once factorized
        self.done = False
        self._at_step: int | None = None
        self._follower = StructureFollower()
        self._originals: dict[str, nn.Module] = {}  # layers replaced in this fit's setup (restored on failure)

    def _key_fields(self) -> dict[str, Any]:
        return {"rank": self.rank, "rank_ratio": self.rank_ratio, "energy": self.energy, "start": self.start,
                "parameters": self.parameters, "exclude": self.exclude}

    def _ready(self) -> bool:
        return True

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._training = False
        _check_sharding(trainer, pl_module, type(self).__name__, layers_before_sharding=True)
        self._originals = {}
        self._follower.attach(pl_module)  # a checkpoint written after the change loads into the new structure
        if self.done:
            return  # this model was factorized by an earlier fit
        target = _compression_target(pl_module)
        self.layers = self._select(target)
        if self.start > 0:
            check_mid_fit(trainer, type(self).__name__, "start", self.start)
        else:
            modules = dict(target.named_modules())
            self._originals = {n: modules[n] for n in self.layers}
            self._factorize(trainer, pl_module, mid_fit=False)
            self._reselect(trainer, pl_module, stage)

    def _select(self, target: nn.Module) -> list[str]:
        refs = select_parameters(target, self.parameters, self.exclude, kinds=_KINDS)
        layers: list[str] = []
        left_out: dict[str, str] = {}
        for ref in refs:
            if ref.attr != "weight" or ref.module_name in layers:
                continue
            why = tied_to(target, ref.module_name) or factorizable(ref.module)
            if why is not None:
                if self.parameters is not None:
                    fail("parameters", "layers that can be factorized", ref.name, hint=f"{why}; exclude it")
                left_out[ref.module_name] = why  # the default selection leaves it out, and says so
                continue
            check_rank(ref.module_name, ref.module, self.rank)
            layers.append(ref.module_name)
        if not layers:
            fail("parameters", "a selection with at least one Linear, Conv1D or ungrouped convolution",
                 self.parameters, hint="no selected layer can be factorized: "
                 + "; ".join(f"{k}: {v}" for k, v in left_out.items()))
        if left_out:
            rank_zero_warn(f"{type(self).__name__}: {len(left_out)} layer(s) stay dense: "
                           + "; ".join(f"{k}: {v}" for k, v in left_out.items()))
        return layers

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.done:
            self._at_step = self._check_before_end(trainer, "start", self.start)
            modules = dict(_compression_target(pl_module).named_modules())
            for name in self.layers:  # other callbacks' setup ran since ours (QAT converts layers there)
                why = factorizable(modules[name])
                if why is not None:
                    fail("start", "0 when another callback changes the selected layers before training", self.start,
                         hint=f"`{name}`: {why}")
            self._check_pruners(trainer, modules, self._at_step)

    def _replaced(self, modules: dict[str, nn.Module]) -> dict[int, str]:
        """The weights this callback replaces (or may, with ``energy``) at ``start``, by tensor id: their layers."""
        return {id(modules[n].get_parameter("weight")): n for n in self.layers if may_factorize(
            modules[n], rank=self.rank, rank_ratio=self.rank_ratio, energy=self.energy)}

    def _check_pruners(self, trainer: pl.Trainer, modules: dict[str, nn.Module], at_step: int) -> None:
        """Refuse a pruning callback that masks the weights of layers replaced at ``start``: its masks would stay on
        the replaced weights (the factors dense, the sparsity it reports untrue), and channels it removes would not
        match the factorized layer. Checked when every callback's pruner exists, before the first step."""
        replaced = self._replaced(modules)
        for other in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
            if other is self or not isinstance(other, _PruningBase):
                continue
            remove_at = getattr(other, "remove_at", None)
            if remove_at is not None and remove_at * other._steps_per_interval(trainer) <= at_step:
                continue  # its channels are gone before the factorization, which sees the smaller layers
            shared = sorted({replaced[i] for i in other._touched() if i in replaced}, key=self.layers.index)
            if shared:
                who, me = type(other).__name__, type(self).__name__
                fail("start", f"0 when {who} prunes layers that {me} replaces", self.start,
                     hint=f"{who} masks the weights of {', '.join(shared)}, which {me} replaces by two factors at "
                          f"optimizer step {at_step}: the masks would stay on the replaced weights, the "
                          f"factors would be dense and removed channels would not match them. Factorize before "
                          f"training (start=0) so that {who} prunes the factors, or keep these layers out of one "
                          "of the two callbacks (`exclude=`)")

    def _reselect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Pruning callbacks placed before this one selected their tensors in their own ``setup``, in the layers
        just replaced: they select again, in the factorized model (so either order prunes the factors)."""
        replaced = {id(layer.get_parameter("weight")) for name, layer in self._originals.items()
                    if self.results[name].factorized}
        for other in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
            if other is self or not isinstance(other, _PruningBase) or not other._touched() & replaced:
                continue
            other.setup(trainer, pl_module, stage)
            if other._touched() & replaced:  # it kept its selection (e.g. traced for dead channels already)
                fail_state(f"{type(other).__name__} selected its tensors before {type(self).__name__} replaced their "
                           "layers", type(other).__name__, f"place {type(self).__name__} before "
                           f"{type(other).__name__} in the Trainer's `callbacks`, so that it prunes the factors")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._training = True
        if not self.done and self._at_step is not None and trainer.global_step >= self._at_step:
            self._factorize(trainer, pl_module, mid_fit=True)

    def _factorize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, mid_fit: bool) -> None:
        target = _compression_target(pl_module)
        modules = dict(target.named_modules())
        old = {n: modules[n].get_parameter("weight") for n in self.layers}
        before = sum(p.numel() for p in target.parameters())
        self.results = factorize_(target, self.layers, rank=self.rank, rank_ratio=self.rank_ratio,
                                  energy=self.energy)
        self.done = True
        modules = dict(target.named_modules())
        if mid_fit:
            replacements: dict[nn.Parameter, list[tuple[nn.Parameter, None]]] = {}
            for name, weight in old.items():
                new = modules[name]
                if isinstance(new, Factorized):
                    replacements[weight] = [(new.first.get_parameter("weight"), None),
                                            (new.second.get_parameter("weight"), None)]
            point_optimizers(trainer, type(self).__name__, replacements)
        after = sum(p.numel() for p in target.parameters())
        self._log(trainer, {f"{self.log_prefix}/params": float(after)})
        if self.verbose:
            done = [n for n, r in self.results.items() if r.factorized]
            ranks = ", ".join(f"{n}: {r.rank}/{r.full_rank} (error {r.error:.3f})" for n, r in self.results.items()
                              if r.factorized)
            rank_zero_info(f"{type(self).__name__}: step {trainer.global_step}, factorized {len(done)} of "
                           f"{len(self.results)} layers ({ranks}); parameters {before:,} -> {after:,}")

    def _undo(self, pl_module: pl.LightningModule) -> None:
        target = _compression_target(pl_module)
        for name, module in self._originals.items():
            target.set_submodule(name, module)
        if self._originals:
            self.done, self.results = False, {}
        self._originals = {}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._follower.detach()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}  # the ranks live in the checkpoint's shapes (what `match_structure_` reads)

    def _load(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))
