"""`DistillationModule`: teacher-student distillation as a LightningModule users subclass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from litcompress._calls import call_model
from litcompress._validation import fail, fail_state
from litcompress.distillation import batches as _batches
from litcompress.distillation.cache import TeacherCache, attach_cache
from litcompress.distillation.config import FeatureDistillation, MixupTransfer
from litcompress.distillation.features import capture, feature_pairs, feature_terms, make_adapters
from litcompress.distillation.losses import kd_loss, mse_distillation_loss
from litcompress.distillation.options import check_dtypes, check_models, check_options
from litcompress.distributed import check_synced

__all__ = ["DistillationModule"]

TaskLoss = Callable[[Tensor, Tensor], Tensor]
_TRUE_PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


class DistillationModule(pl.LightningModule):
    r"""Distil a frozen ``teacher`` into ``student`` inside an ordinary ``Trainer.fit``.

    The loss is Hinton et al.'s: ``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * task_loss``.
    Each part is logged (``train/kd_loss``, ``train/task_loss``, ``train/loss``). Validation logs the student's
    ``val/acc``, ``val/f1`` (macro) and ``val/loss``, the same for the teacher under ``teacher/val/...`` (the
    baseline :class:`~litcompress.callbacks.CompressionReport` compares against), and ``val/agreement``, the
    student's top-1 agreement with the teacher.

    The teacher is held outside the module tree: it is never in ``state_dict`` (checkpoints are student-side
    only), never in the optimizer, never wrapped by DDP, always in eval mode (dropout and BatchNorm statistics
    never change, and Lightning's train/eval-mode warnings do not fire), and runs under ``torch.no_grad``. It is
    moved to the student's device when a fit starts. ``compression_target`` is the student, so the
    :class:`~litcompress.callbacks.Pruning` and :class:`~litcompress.callbacks.QuantizationAwareTraining`
    callbacks compress the student only.

    Hugging Face models work as they are. A dict batch is passed as keyword arguments (``model(**inputs)``); its
    ``labels`` never reach the teacher, and reach the student when the task loss is cross entropy, which is then
    the student's own ``loss`` output (cross entropy against ``labels`` if it returns none). Outputs give their
    ``logits``. Token KD skips positions whose ``attention_mask`` is 0 or whose label is ``ignore_index``. With
    ``shift_labels``, a dict batch's labels are aligned as a causal LM's loss aligns them: ``val/acc`` compares
    ``logits[:, t]`` with ``labels[:, t + 1]`` (KD skips ``t`` when that label is ``ignore_index``); otherwise
    (sequence classification, tuple batches) labels are compared as they are.

    Subclass to change any step; each is a small method: :meth:`unpack_batch`, :meth:`student_inputs`,
    :meth:`student_forward`, :meth:`teacher_forward`, :meth:`logits`, :meth:`model_loss`, :meth:`task_loss`,
    :meth:`distillation_loss`, :meth:`configure_optimizers`.

    Args:
        student: the model to train; ``forward`` runs it.
        teacher: the trained model to learn from, or a list of them (a
            :class:`~litcompress.distillation.TeacherEnsemble`: their softened predictions are averaged), or
            ``None`` to load a checkpoint for inference only.
        temperature: softmax temperature ``T > 0`` (around 4 works well; see the README on budgets).
        alpha: weight of the distillation term in ``[0, 1]``; ``1 - alpha`` weighs the task loss.
        task_loss: ``"cross_entropy"`` (default), ``"mse"`` (regression: distillation becomes MSE too),
            a callable ``fn(student_output, target)``, or ``None`` for label-free distillation (``alpha=1``).
        ignore_index: target value of padding positions in sequence outputs ``(B, T, V)``; they count in
            neither loss (a Hugging Face model's own loss ignores -100, its convention).
        shift_labels: a dict batch's ``labels`` are the input tokens, so the logits at position ``t`` predict the
            label at ``t + 1`` (causal LMs); ``None``: True for Hugging Face causal LMs (``...ForCausalLM``,
            ``...LMHeadModel``).
        lr: learning rate of the default AdamW optimizer.
        weight_decay: weight decay of the default AdamW optimizer.
        num_classes: classes (or vocabulary size) for the validation metrics; inferred when omitted.
        features: feature distillation: a :class:`~litcompress.distillation.FeatureDistillation` (pairs of layers,
            the loss, its weight), or just its pairs ``{"student.layer": "teacher.layer", ...}`` with the default
            loss (``"mse"``) and weight (1.0).
        cache: run the teacher once per distinct input and reuse its outputs in later epochs: ``True`` (a
            :class:`~litcompress.distillation.TeacherCache` with its defaults) or a ``TeacherCache`` with the memory
            bound, storage dtype, ``top_k`` and whether checkpoints hold its contents. Keys are content hashes of
            the inputs, so augmented inputs never get stale targets; when an epoch after a complete cached pass
            finds fewer than half its inputs cached (random augmentation; a full cache is not taken for it), a
            warning says so and the cache turns itself off. The student always trains on the stored
            representation, cached or not. Not with ``features``.
        transfer: an extra transfer set, a :class:`~litcompress.distillation.MixupTransfer`: each step adds its
            ``size`` random convex mixes of two inputs of the batch, labelled by the teacher only, with weight
            ``alpha`` (logged as ``train/transfer_loss``). Floating-point inputs only.

    Example:
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> module = DistillationModule(nn.Linear(8, 3), teacher, temperature=4.0, alpha=0.9)
        >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=16)
        >>> pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...            enable_model_summary=False).fit(module, data)
        >>> sorted(module.state_dict())  # the student only: the teacher is never saved
        ['student.bias', 'student.weight']
    """

    _teacher: nn.Module | None  # set with object.__setattr__ (see the `teacher` setter), so declared here

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | None,
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        task_loss: Literal["cross_entropy", "mse"] | TaskLoss | None = "cross_entropy",
        ignore_index: int = -100,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        num_classes: int | None = None,
        shift_labels: bool | None = None,
        features: FeatureDistillation | Mapping[str, str] | None = None,
        cache: bool | TeacherCache = False,
        transfer: MixupTransfer | None = None,
    ) -> None:
        super().__init__()
        teacher = check_models(student, teacher, temperature, task_loss)
        check_options(temperature=temperature, alpha=alpha, task_loss=task_loss, ignore_index=ignore_index, lr=lr,
                      weight_decay=weight_decay, num_classes=num_classes, shift_labels=shift_labels)
        feature_config, transfer = _as_features(features), _as_transfer(transfer)
        self.student = student
        object.__setattr__(self, "_teacher", None)  # outside the module tree: no state_dict keys, no DDP, no optim
        self.teacher = teacher
        self.temperature, self.alpha, self.task_loss_kind = float(temperature), float(alpha), task_loss
        self.ignore_index, self.lr, self.weight_decay = ignore_index, lr, weight_decay
        self.num_classes = num_classes
        self.feature_config = feature_config
        self.features = feature_pairs(feature_config.pairs if feature_config else None, student, teacher)
        self.feature_loss_kind = feature_config.loss if feature_config else "mse"
        self.feature_weight = float(feature_config.weight) if feature_config else 1.0
        # student-side state: trained with the student, saved in checkpoints
        self.adapters = (make_adapters(self.features, student, teacher)
                         if teacher is not None and self.feature_loss_kind != "attention" else nn.ModuleDict())
        self.teacher_cache = attach_cache(cache, self.temperature, features=bool(self.features),
                                          regression=task_loss == "mse")
        self.transfer = transfer
        self.shift_labels = _batches.is_causal_lm(student) if shift_labels is None else shift_labels
        self._student_takes_labels = _batches.accepts_keyword(student, _batches.LABELS)
        self.val_metrics: MetricCollection | None = None  # built at the first validation batch (class count)
        self.teacher_val_metrics: MetricCollection | None = None
        self.val_agreement: MulticlassAccuracy | None = None

    # ------------------------------------------------------------------ the teacher
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a submodule: see the class docstring)."""
        return self._teacher

    @teacher.setter
    def teacher(self, teacher: nn.Module | None) -> None:
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":  # nn.Module.__setattr__ would register a module value as a submodule
            object.__setattr__(self, name, value)  # runs the `teacher` property's setter
        else:
            super().__setattr__(name, value)

    @property
    def compression_target(self) -> nn.Module:
        """What litcompress callbacks compress: the student."""
        return self.student

    @override
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()  # whatever Lightning does to the student, the teacher stays in eval mode
        return self

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.teacher is None:
            fail("teacher", "a teacher model for training", None,
                  hint="pass `teacher=` (a teacher is only optional for inference from a checkpoint)")
        precision = str(self.trainer.precision) if stage == "fit" else ""
        if self.teacher is not None and stage == "fit" and "mixed" not in precision:  # mixed: autocast casts
            # before Lightning converts the student to its precision
            check_dtypes(self.student, self.teacher, _TRUE_PRECISION_DTYPES.get(precision))

    @override
    def on_fit_start(self) -> None:
        check_synced(self)  # FSDP2: the adapters this module adds must be sharded with the student
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ------------------------------------------------------------------ overridable steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the student."""
        return self.student(*args, **kwargs)

    def unpack_batch(self, batch: Any) -> tuple[Any, Any]:
        """Split a batch into ``(inputs, targets)``: a tuple's first two items, or a dict's ``labels`` and the dict
        of the other keys; ``targets`` is ``None`` for unlabeled batches."""
        return _batches.split_batch(batch)

    def student_inputs(self, inputs: Any, targets: Any) -> Any:
        """What the student is given: the inputs, plus a dict batch's ``labels`` when its own loss is used."""
        return {**inputs, _batches.LABELS: targets} if self._own_loss(inputs, targets) else inputs

    def student_forward(self, inputs: Any) -> Any:
        """The student's raw output: ``student(**inputs)`` for a dict of inputs, ``student(inputs)`` otherwise."""
        return call_model(self.student, inputs)

    def teacher_forward(self, inputs: Any) -> Any:
        """The teacher's raw output, as :meth:`student_forward` (``labels`` are never passed) under ``no_grad``."""
        assert self.teacher is not None  # `setup` refuses to fit without one
        with torch.no_grad():
            return call_model(self.teacher, inputs)

    def logits(self, output: Any) -> Tensor:
        """The logits of a model's output: a tensor as it is, else its ``logits`` attribute or key (a Hugging Face
        ``ModelOutput``). Override for models that return something else."""
        return _batches.output_logits(output)

    def model_loss(self, output: Any) -> Tensor | None:
        """The loss the student computed itself from the ``labels`` it was given (``output.loss``), or ``None``."""
        return _batches.output_loss(output)

    def _own_loss(self, inputs: Any, targets: Any) -> bool:
        return (isinstance(inputs, Mapping) and targets is not None and self.task_loss_kind == "cross_entropy"
                and self._student_takes_labels and (self.alpha < 1 or not self.training))

    def task_loss(self, student_out: Tensor, targets: Tensor) -> Tensor:
        """Loss against the targets aligned with the outputs (cross entropy over the last dim, MSE, or your fn)."""
        if callable(self.task_loss_kind):
            return self.task_loss_kind(student_out, targets)
        if self.task_loss_kind == "mse":
            return F.mse_loss(student_out, targets)
        return F.cross_entropy(student_out.reshape(-1, student_out.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=self.ignore_index)

    def _task_term(self, raw: Any, logits: Tensor, aligned: Tensor, own: bool) -> Tensor:
        loss = self.model_loss(raw) if own else None
        return loss if loss is not None else self.task_loss(logits, aligned)

    def distillation_loss(self, student_out: Tensor, teacher_out: Tensor, targets: Tensor | None,
                          mask: Tensor | None = None) -> Tensor:
        """Soft-target KL scaled by ``T^2`` (MSE for regression) over the positions ``mask`` keeps (token logits;
        by default those whose ``targets`` are not ``ignore_index``).

        Args:
            student_out: the student's logits, ``(B, C)`` or ``(B, T, V)`` (or regression outputs).
            teacher_out: the teacher's, shaped alike (from the cache when it is on).
            targets: the labels aligned with the logits (for the default mask), or ``None``.
            mask: the positions that count (``True``), ``(B, T)`` for token logits; ``None``: those whose
                ``targets`` are not ``ignore_index``.

        Returns:
            The scalar distillation loss.
        """
        if self.task_loss_kind == "mse":
            return mse_distillation_loss(student_out, teacher_out)
        if mask is None:  # `losses` passes the batch's mask; by default, the targets' padding
            mask = _batches.position_mask(student_out, targets, None, self.ignore_index)
        return kd_loss(student_out, teacher_out, self.temperature, mask)

    def feature_distillation_loss(self, student_features: dict[str, Tensor],
                                  teacher_features: dict[str, Tensor]) -> Tensor:
        """Sum over the ``features`` pairs of the distance between adapted student and teacher features."""
        return feature_terms(self.features, student_features, teacher_features, self.student, self.adapters,
                             self.feature_loss_kind)

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """All loss parts for one batch: ``loss``, ``kd_loss`` and (when used) ``task_loss``, ``feature_loss``."""
        inputs, targets = self.unpack_batch(batch)
        own = self._own_loss(inputs, targets)
        with capture(self.student, list(self.features)) as s_feats:
            student_raw = self.student_forward(self.student_inputs(inputs, targets))
        student_out = self.logits(student_raw)
        assert self.teacher is not None  # `setup` refuses to fit without one
        with capture(self.teacher, list(self.features.values())) as t_feats:
            teacher_out = self._teacher_outputs(inputs)
        aligned, mask = _batches.targets_and_mask(student_out, targets, inputs, self.shift_labels, self.ignore_index)
        parts = {"kd_loss": self.distillation_loss(student_out, teacher_out, aligned, mask)}
        loss = self.alpha * parts["kd_loss"]
        if self.features:
            parts["feature_loss"] = self.feature_distillation_loss(s_feats, t_feats)
            loss = loss + self.feature_weight * parts["feature_loss"]
        if self.transfer is not None and self.training:
            mixed = self.mixup_inputs(inputs)
            parts["transfer_loss"] = self.distillation_loss(self.logits(self.student_forward(mixed)),
                                                            self.logits(self.teacher_forward(mixed)), None)
            loss = loss + self.alpha * parts["transfer_loss"]
        if self.alpha < 1:
            if targets is None:
                fail_state("A batch without targets (not (inputs, targets), nor a dict with 'labels') reached a loss "
                           "that needs them (alpha < 1)", "DistillationModule.losses", "give batches with targets, or "
                           "set alpha=1.0 and task_loss=None for label-free distillation", exc=ValueError)
            parts["task_loss"] = self._task_term(student_raw, student_out, aligned, own)
            loss = loss + (1 - self.alpha) * parts["task_loss"]
        parts["loss"] = loss
        return parts

    def mixup_inputs(self, inputs: Tensor) -> Tensor:
        """The transfer set's ``size`` convex mixes of two random inputs of the batch (seeded by its ``seed`` and the
        step)."""
        transfer = self.transfer if self.transfer is not None else MixupTransfer()
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            fail_state(f"{transfer!r} got inputs that are not one floating-point tensor "
                       f"({type(inputs).__name__})", "DistillationModule.mixup_inputs", "mixup mixes inputs; token ids "
                       "or structured batches cannot be mixed: pass transfer=None", exc=ValueError)
        generator = torch.Generator().manual_seed(transfer.seed * 1_000_003 + self.global_step)
        return _batches.mix_inputs(inputs, transfer.size, generator)

    def _teacher_outputs(self, inputs: Any) -> Tensor:
        cache = self.teacher_cache
        if cache is None or not self.training or not isinstance(inputs, (Tensor, Mapping)):
            return self.logits(self.teacher_forward(inputs))
        if not cache.enabled:  # the same representation as while it was on
            return cache.round_trip(self.logits(self.teacher_forward(inputs)))
        keys = cache.keys(inputs)  # a dict batch: every tensor the teacher sees (its labels are not among them)
        cached = cache.lookup(keys)
        if cached is not None:
            return cached.to(self.device)
        return cache.add(keys, self.logits(self.teacher_forward(inputs)))  # as a hit would give them

    def _end_cache_epoch(self, cache: TeacherCache) -> None:
        trainer, limit = self.trainer, self.trainer.limit_train_batches  # a limited or sharded epoch: not all data
        batches = trainer.num_training_batches  # inf for a dataloader without a length
        whole = isinstance(limit, float) and limit == 1.0 and trainer.world_size == 1 and batches != float("inf")
        if message := cache.end_epoch(int(batches) if whole else None):
            rank_zero_warn(message)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and self.teacher_cache is not None and self.teacher_cache.batches:
            self._end_cache_epoch(self.teacher_cache)  # the last epoch's end hook, which a resume from its end skips

    @override
    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None:
            self._end_cache_epoch(self.teacher_cache)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher_cache is not None:
            checkpoint["litcompress_teacher_cache"] = self.teacher_cache.state_dict(self.teacher_cache.in_checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher_cache is not None and "litcompress_teacher_cache" in checkpoint:
            self.teacher_cache.load_state_dict(checkpoint["litcompress_teacher_cache"])

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        parts = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=False)
        return parts["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = self.unpack_batch(batch)
        own = self._own_loss(inputs, targets)
        student_raw = self.student_forward(self.student_inputs(inputs, targets))
        student_out = self.logits(student_raw)
        teacher_out = self.logits(self.teacher_forward(inputs)) if self.teacher is not None else None
        if self.task_loss_kind == "mse" or student_out.dim() < 2:
            return
        if self.val_metrics is None:
            classes, ignore = self.num_classes or student_out.shape[-1], self.ignore_index
            metrics = MetricCollection({"acc": MulticlassAccuracy(classes, average="micro", ignore_index=ignore),
                                        "f1": MulticlassF1Score(classes, average="macro", ignore_index=ignore)})
            self.val_metrics = metrics.clone(prefix="val/").to(self.device)
            self.teacher_val_metrics = metrics.clone(prefix="teacher/val/").to(self.device)
            self.val_agreement = MulticlassAccuracy(classes, average="micro").to(self.device)
        assert self.teacher_val_metrics is not None and self.val_agreement is not None  # built with val_metrics
        aligned, mask = _batches.targets_and_mask(student_out, targets, inputs, self.shift_labels, self.ignore_index)
        if aligned is not None:
            for out, collection, prefix in ((student_out, self.val_metrics, ""),
                                            (teacher_out, self.teacher_val_metrics, "teacher/")):
                if out is not None:
                    collection(out.argmax(-1).reshape(-1), aligned.reshape(-1))
                    self.log_dict(collection)
                    self.log(f"{prefix}val/loss", self._task_term(student_raw, out, aligned, own and not prefix))
        if teacher_out is not None:
            s_top, t_top = student_out.argmax(-1), teacher_out.argmax(-1)
            if mask is not None:  # positions that count (not padding)
                s_top, t_top = s_top[mask], t_top[mask]
            self.val_agreement(s_top.reshape(-1), t_top.reshape(-1))
            self.log("val/agreement", self.val_agreement)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the student's trainable parameters and the feature adapters (all this module registers)."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                 weight_decay=self.weight_decay)


def _as_features(features: Any) -> FeatureDistillation | None:
    """``features`` as :class:`~litcompress.DistillationModule` takes it: ``None``, a mapping (its pairs, with the
    default loss and weight) or a :class:`~litcompress.distillation.FeatureDistillation`."""
    if features is None or isinstance(features, FeatureDistillation):
        return features
    if isinstance(features, Mapping):
        return FeatureDistillation(dict(features))
    fail("features", "None, a mapping of student to teacher layer names, or a FeatureDistillation",
         type(features).__name__, exc=TypeError)


def _as_transfer(transfer: Any) -> MixupTransfer | None:
    """``transfer`` as :class:`~litcompress.DistillationModule` takes it: ``None`` or a
    :class:`~litcompress.distillation.MixupTransfer`."""
    if transfer is None or isinstance(transfer, MixupTransfer):
        return transfer
    fail("transfer", "None or a MixupTransfer", transfer, exc=TypeError, hint="e.g. transfer=MixupTransfer(size=64)")
