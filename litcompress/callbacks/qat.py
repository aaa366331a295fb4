"""`QuantizationAwareTraining`: fake-quantized training inside ``Trainer.fit``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from litcompress._shards import is_dtensor
from litcompress._validation import check_int, check_real, fail
from litcompress.callbacks._base import (
    _check_common,
    _check_sharding,
    _compression_target,
    _CompressionCallback,
    _warn_inexact_resume,
)
from litcompress.distributed import check_synced
from litcompress.quantization.access import quantized_layers
from litcompress.quantization.layers import QUANTIZABLE_KINDS, QuantizedLayer, convert_, revert_
from litcompress.quantization.plan import conversion_plan
from litcompress.quantization.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer
from litcompress.selection import ParameterFilter, select_parameters

__all__ = ["QuantizationAwareTraining"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _Steps(TypedDict):
    """The schedule in optimizer steps, converted once per fit (``None``: never)."""

    start: int
    freeze_observers: int | None
    freeze_bn: int | None


class QuantizationAwareTraining(_CompressionCallback):
    r"""Train with fake-quantized weights and activations, so the model learns to live on an integer grid.

    In ``setup`` the selected layers are converted in place (their class becomes a fake-quantizing subclass; the
    ``Parameter`` objects, so the optimizer, and the ``state_dict`` keys stay the same). From ``start`` on,
    weights are fake-quantized symmetrically (a zero weight stays exactly zero, so pruned models stay sparse)
    and the inputs of Linear, Conv and attention projections asymmetrically, per tensor, with ranges from an
    exponential moving average of min/max. Validation and test inside the fit therefore report the quantized
    model's metrics. Embeddings and recurrent layers are weight-only.

    Args:
        weight_bits: 2..8.
        weight_granularity: ``"per_channel"`` (one scale per output channel) or ``"per_tensor"``.
        activation_bits: 2..8, or ``None`` for weight-only quantization.
        scale: ``"minmax"``; ``"power_of_two"`` (scales ``2^-p``: integer weights ``round(w * 2^p)``);
            ``"learned"`` (LSQ: step sizes trained from ``start`` on, initialised from the observed ranges,
            gradient scale ``1 / sqrt(N * Q_P)``; they join the first optimizer as an extra parameter group).
        start: when fake quantization begins, in ``interval`` units (epochs by default); it must fall inside the fit.
        freeze_observers: when ranges stop updating (``None``: never); after ``start``.
        freeze_bn: when BatchNorm running statistics freeze (``None``: never).
        interval: the unit of ``start``, ``freeze_observers`` and ``freeze_bn``: ``"epoch"`` (default, as in every
            litcompress callback) or ``"step"`` (optimizer steps). Either way the switch happens at an optimizer
            step (``trainer.global_step``).
        parameters: which layers, as for :class:`~litcompress.callbacks.Pruning`: ``None`` selects Linear,
            Hugging Face's Conv1D (GPT-2), Conv1d/2d/3d, Embedding, LSTM/GRU/RNN and MultiheadAttention; regexes or
            ``fn(module, name)`` pick weight tensors by name. A weight tied between layers (an embedding and its LM
            head) is quantized in all of them by one quantizer, so the model trains as it is deployed.
        exclude: weight names to keep in float; ``["<first>", "<last>"]`` keeps both ends of the network.
        averaging_constant: weight of a new batch in the observers' moving average of activation ranges, in
            ``(0, 1]`` (torch.ao's name for it).
        scale_lr: learning rate of learned step sizes (default: the first parameter group's).
        verbose: print a line when quantization starts and when things freeze (rank zero).
    """

    def __init__(
        self,
        weight_bits: int = 8,
        weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel",
        activation_bits: int | None = 8,
        scale: Literal["minmax", "power_of_two", "learned"] = "minmax",
        *,
        start: int = 0,
        freeze_observers: int | None = None,
        freeze_bn: int | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        parameters: str | Sequence[str] | ParameterFilter | None = None,
        exclude: str | Sequence[str] = (),
        averaging_constant: float = 0.01,
        scale_lr: float | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(interval)
        self.config = QuantConfig(weight_bits, weight_granularity, activation_bits, scale, averaging_constant)
        check_int("start", start, minimum=0)
        check_int("freeze_observers", freeze_observers, minimum=0, allow_none=True)
        check_int("freeze_bn", freeze_bn, minimum=0, allow_none=True)
        if freeze_observers is not None and freeze_observers <= start:
            fail("freeze_observers", f"None or > `start` ({start})", freeze_observers,
                  hint="ranges must be observed for a while after quantization starts before they freeze")
        check_real("scale_lr", scale_lr, allow_none=True)
        _check_common(parameters, exclude, verbose)
        self.start, self.freeze_observers, self.freeze_bn = start, freeze_observers, freeze_bn
        self.parameters, self.exclude, self.scale_lr, self.verbose = parameters, exclude, scale_lr, verbose

        self.layers: dict[str, QuantizedLayer] = {}
        self._converted: list[nn.Module] = []  # converted by this fit's setup
        self._bn: list[nn.Module] = []
        self._flags = {"enabled": False, "observers_frozen": False, "bn_frozen": False}
        self._steps: _Steps | None = None  # set in `on_train_start`

    def _key_fields(self) -> dict[str, Any]:
        return {"config": self.config, "parameters": self.parameters, "exclude": self.exclude}

    def _ready(self) -> bool:
        return bool(self.layers)

    # ------------------------------------------------------------------ quantizers
    def _weight_quantizers(self) -> list[tuple[QuantizedLayer, str, WeightQuantizer]]:
        """Each weight quantizer once (a tied weight's quantizer serves several layers), with a layer holding it."""
        found: dict[int, tuple[QuantizedLayer, str, WeightQuantizer]] = {}
        for m in self.layers.values():
            for a, q in m.weight_quantizers.items():
                found.setdefault(id(q), (m, a, q))
        return list(found.values())

    def _input_quantizers(self) -> list[ActivationQuantizer]:
        return [q for m in self.layers.values() for q in m.input_quantizers.values()]

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._training = False
        _check_sharding(trainer, pl_module, type(self).__name__, layers_before_sharding=True)
        target = _compression_target(pl_module)
        if next(target.parameters(), None) is None:
            return  # layers are built in `configure_model`: convert in `on_fit_start`
        self._prepare(target, trainer)

    def _check_overlap(self, trainer: pl.Trainer | None, target: nn.Module, layers: Mapping[str, Any],
                       modules: Mapping[str, nn.Module]) -> None:
        """A layer is quantized by one callback, with one configuration: a second QAT callback on the same layers
        (or a layer converted earlier with other settings) would silently train with settings not asked for."""
        others = [c for c in (trainer.callbacks if trainer is not None else [])  # type: ignore[attr-defined]
                  if isinstance(c, QuantizationAwareTraining) and c is not self and c.layers]
        for name in layers:
            module = modules[name]
            if any(module is layer for other in others for layer in other.layers.values()):
                fail("parameters", "layers no other QuantizationAwareTraining callback of this Trainer quantizes",
                      name, hint="give each callback a disjoint selection (`parameters` / `exclude`)")
            if isinstance(module, QuantizedLayer) and any(q.config != self.config
                                                          for q in module.weight_quantizers.values()):
                fail("parameters", "layers not already quantized with other settings", name,
                      hint="this layer was converted by an earlier QuantizationAwareTraining with another "
                           "configuration; restore the plain model or use the same arguments")

    def _prepare(self, target: nn.Module, trainer: pl.Trainer | None = None) -> None:
        refs = select_parameters(target, self.parameters, self.exclude, kinds=QUANTIZABLE_KINDS)
        modules: dict[str, nn.Module] = dict(target.named_modules())
        layers = conversion_plan(target, refs)
        self._check_overlap(trainer, target, layers, modules)
        fresh = {n: a for n, a in layers.items() if not isinstance(modules[n], QuantizedLayer)}
        convert_(target, self.config, fresh)  # layers converted by an earlier fit keep their quantizers
        self._converted = [modules[n] for n in fresh]  # undone if the fit fails before its first step
        converted = quantized_layers(target)
        self.layers = {n: converted[n] for n in layers}
        self._bn = [m for m in target.modules() if isinstance(m, _BATCH_NORMS)]
        self._apply_pending_state()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_synced(pl_module)
        if not self.layers:
            self._prepare(_compression_target(pl_module), trainer)
        for module in self.layers.values():  # FSDP2: no whole fake-quantized weight kept from forward to backward
            module.recompute_weights = any(is_dtensor(module.weight_tensor(k)) for k in module.weight_quantizers)
        if self.config.scale != "learned":
            return
        # step sizes join the optimizer now, idle until `start`, so a resumed optimizer state lines up
        scales = [q.scale if q.scale is not None else q.placeholder(m.weight_tensor(a))
                  for m, a, q in self._weight_quantizers()]
        for module in self.layers.values():
            device = next(module.parameters()).device
            scales += [q.scale if q.scale is not None else q.placeholder(device)
                       for q in module.input_quantizers.values()]
        optimizer = trainer.optimizers[0]
        if not any(any(p is scales[0] for p in g["params"]) for g in optimizer.param_groups):
            lr = self.scale_lr if self.scale_lr is not None else optimizer.param_groups[0]["lr"]
            # `initial_lr`: LR schedulers built before this group expect it on every group
            optimizer.add_param_group({"params": scales, "lr": lr, "initial_lr": lr, "weight_decay": 0.0})

    def _undo(self, pl_module: pl.LightningModule) -> None:
        for module in self._converted:
            revert_(module)
        self._converted = []
        self.layers = {}
        self._bn = []

    # ------------------------------------------------------------------ schedule
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _warn_inexact_resume(trainer)
        # the clock: every point in optimizer steps, converted once; a start the fit never reaches is an error
        self._steps = _Steps(start=self._check_before_end(trainer, "start", self.start),
                             freeze_observers=self._to_steps(trainer, self.freeze_observers),
                             freeze_bn=self._to_steps(trainer, self.freeze_bn))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._training = True
        step, at = trainer.global_step, self._steps
        assert at is not None  # `on_train_start` ran
        if not self._flags["enabled"] and step >= at["start"]:
            self._set_enabled(True)
            if self.config.scale == "learned":
                for module, attr, q in self._weight_quantizers():
                    q.start_learning(module.weight_tensor(attr))
            self._say(trainer, "fake quantization on")
        freeze_observers, freeze_bn = at["freeze_observers"], at["freeze_bn"]
        if freeze_observers is not None and not self._flags["observers_frozen"] and step >= freeze_observers:
            self._freeze_observers()
            self._say(trainer, "ranges frozen")
        if freeze_bn is not None and step >= freeze_bn:
            if not self._flags["bn_frozen"]:
                self._flags["bn_frozen"] = True
                self._say(trainer, "BatchNorm statistics frozen")
            for bn in self._bn:  # Lightning puts the model in train mode every epoch
                bn.eval()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending: list[tuple[ActivationQuantizer, tuple[Tensor, Tensor]]] = [
            (q, batch) for q in self._input_quantizers() if (batch := q.pending) is not None]
        if not pending:
            return
        observed = [q for q, _ in pending]
        lo = torch.stack([batch[0] for _, batch in pending])
        hi = torch.stack([batch[1] for _, batch in pending])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            lo, hi = lo.to(trainer.strategy.root_device), hi.to(trainer.strategy.root_device)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)  # every process quantizes with the same range
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        for q, a, b in zip(observed, lo, hi):
            q.commit(a, b)
        if self.config.scale == "learned":
            for q in observed:
                if not q.learning:
                    q.start_learning()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # learned step sizes are not module parameters, so neither DDP nor FSDP averages their gradients: each
        # process would learn its own scales from its own samples. One collective averages them all.
        if self.config.scale != "learned" or trainer.world_size < 2:
            return
        every = [q.scale for _, _, q in self._weight_quantizers()] + [q.scale for q in self._input_quantizers()]
        scales = [s for s in every if s is not None and s.requires_grad]
        if not scales:
            return
        flat = torch.cat([(s.grad if s.grad is not None else torch.zeros_like(s)).reshape(-1) for s in scales])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        for s, g in zip(scales, flat.split([s.numel() for s in scales])):
            s.grad = g.reshape(s.shape).to(s.device)

    def _set_enabled(self, value: bool) -> None:
        self._flags["enabled"] = value
        for module in self.layers.values():
            module.fake_quant_enabled = value

    def _freeze_observers(self) -> None:
        self._flags["observers_frozen"] = True
        for module, attr, wq in self._weight_quantizers():
            wq.freeze(module.weight_tensor(attr))
        for aq in self._input_quantizers():
            aq.observing = False

    def _say(self, trainer: pl.Trainer, what: str) -> None:
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: step {trainer.global_step}, {what} ({len(self.layers)} layers)")

    # ------------------------------------------------------------------ outside a Trainer
    def restore(self, model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
        """Convert ``model`` and load this callback's state from a Lightning checkpoint, without a Trainer.

        The path from a checkpoint written during QAT to deployable files, e.g. in a fresh process (the plain
        class loads the weights: the ``state_dict`` keys are unchanged), then the callback's state:

        >>> import tempfile
        >>> from pathlib import Path
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from litcompress.export import export_onnx, save_compressed
        >>> from litcompress.quantization import quantized_weights
        >>> folder = Path(tempfile.mkdtemp())
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[QuantizationAwareTraining(weight_bits=4, verbose=False)],
        ...                      default_root_dir=folder, logger=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> ckpt = next(folder.rglob("*.ckpt"))
        >>> model = BoringModel.load_from_checkpoint(ckpt)  # later, anywhere
        >>> _ = QuantizationAwareTraining(weight_bits=4).restore(model, ckpt)  # same arguments as in training
        >>> quantizer, _ = quantized_weights(model)["layer.weight"]
        >>> quantizer.config.weight_bits
        4
        >>> export_onnx(model, torch.randn(1, 32), folder / "model.onnx").exists()
        True
        >>> save_compressed(model, folder / "model.safetensors").exists()
        True

        (``trainer.validate`` / ``trainer.test`` with ``ckpt_path`` and this callback attached restore it too.)

        Args:
            model: the LightningModule (or plain module) the checkpoint's weights are already loaded into.
            checkpoint: a checkpoint path (loaded with ``weights_only=True``) or an already loaded checkpoint.
        """
        loaded: Mapping[str, Any] = (checkpoint if isinstance(checkpoint, Mapping)
                                     else torch.load(checkpoint, map_location="cpu", weights_only=True))
        states = loaded.get("callbacks", {})
        if self.state_key not in states:
            fail("checkpoint", f"a checkpoint holding this callback's state ({self.state_key})", sorted(states),
                  hint="construct the callback with the same arguments as during training")
        self.layers = {}
        self._pending_state = dict(states[self.state_key])
        self._prepare(_compression_target(model))
        return model

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "flags": dict(self._flags),
            "layers": {
                name: {"weights": {a: q.state_dict() for a, q in m.weight_quantizers.items()},
                       "inputs": {k: q.state_dict() for k, q in m.input_quantizers.items()}}
                for name, m in self.layers.items()
            },
        }

    def _load(self, state: dict[str, Any]) -> None:
        saved = state.get("layers", {})
        if set(saved) != set(self.layers):
            fail("state_dict", f"quantizer states for the layers {sorted(self.layers)}", sorted(saved),
                  hint="the checkpoint was written for a different model or a different selection")
        for name, module in self.layers.items():
            for a, wq in module.weight_quantizers.items():
                wq.load_state_dict(saved[name]["weights"].get(a, {}))
            for k, aq in module.input_quantizers.items():
                aq.load_state_dict(saved[name]["inputs"].get(k, {}))
        self._flags.update(state.get("flags", {}))
        self._set_enabled(self._flags["enabled"])
