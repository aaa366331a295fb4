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

from litcompress._validation import check_choice, check_fraction, check_int, fail
from litcompress.distillation.cache import TeacherCache, check_storage
from litcompress.distillation.ensemble import TeacherEnsemble
from litcompress.distillation.features import (
    FEATURE_LOSSES,
    adapter_key,
    capture,
    channel_dim,
    feature_loss,
    feature_pairs,
    make_adapters,
)
from litcompress.distillation.losses import kd_loss, mse_distillation_loss

__all__ = ["DistillationModule"]

TaskLoss = Callable[[Tensor, Tensor], Tensor]



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

    Subclass to change any step; each is a small method: :meth:`unpack_batch`, :meth:`student_forward`,
    :meth:`teacher_forward`, :meth:`task_loss`, :meth:`distillation_loss`, :meth:`configure_optimizers`.

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
            neither loss.
        lr: learning rate of the default AdamW optimizer.
        weight_decay: weight decay of the default AdamW optimizer.
        num_classes: classes (or vocabulary size) for the validation metrics; inferred when omitted.
        features: feature distillation: ``{"student.layer": "teacher.layer", ...}`` (the prefixes are
            optional). Outputs are captured with forward hooks; a learnable adapter (part of this module, trained
            with the student, saved in checkpoints) maps the student's width to the teacher's.
        feature_loss: ``"mse"``, ``"cosine"``, or ``"attention"`` (attention transfer, Zagoruyko & Komodakis,
            for conv feature maps: no adapter needed).
        feature_weight: weight of the feature term, added to the loss above.
        cache_teacher: run the teacher once per distinct input and reuse its outputs in later epochs. Keys are
            content hashes of the inputs, so augmented inputs never get stale targets; when an epoch after a
            complete cached pass finds fewer than half its inputs cached (random augmentation; a full cache is
            not taken for it), a warning says so and the cache turns itself off. Not with ``features``.
        cache_max_bytes: memory bound of the cache.
        cache_dtype: storage dtype of cached outputs (``torch.float16`` halves memory; float32 is exact); also
            given by name (``"float16"``), e.g. in YAML. The student always trains on the stored representation,
            cached or not.
        cache_top_k: keep only each output row's ``k`` largest logits (and one fill value for the other classes,
            chosen so that at ``temperature`` the kept classes get exactly the teacher's probabilities and the
            rest share the remaining mass evenly). For large vocabularies: with 50k tokens, ``k=32`` in float16
            stores 194 bytes per position instead of 200 kB. Classification outputs only. The student always
            trains on the stored representation, cached or not.
        cache_in_checkpoint: also save the cache contents (up to ``cache_max_bytes``) in checkpoints, so a resumed
            fit need not run the teacher again. By default only the cache's small state is saved; resume is exact
            either way (the targets do not depend on what is cached), the contents only save time.
        transfer: ``"mixup"`` adds ``transfer_size`` extra inputs per training step, each a random convex mix of
            two inputs of the batch, labelled by the teacher only (an extra transfer set; its distillation term
            is added with weight ``alpha`` and logged as ``train/transfer_loss``). Floating-point inputs only.
        transfer_size: extra inputs per step for ``transfer``.
        seed: seed of the transfer draws (with ``global_step``: identical on resume and on every process).

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
        features: Mapping[str, str] | None = None,
        feature_loss: Literal["mse", "cosine", "attention"] = "mse",
        feature_weight: float = 1.0,
        cache_teacher: bool = False,
        cache_max_bytes: int = 1 << 30,
        cache_dtype: torch.dtype | Literal["float32", "float16", "bfloat16"] = torch.float32,
        cache_top_k: int | None = None,
        cache_in_checkpoint: bool = False,
        transfer: Literal["mixup"] | None = None,
        transfer_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            fail("student", "a torch.nn.Module", type(student).__name__, exc=TypeError)
        if isinstance(teacher, (list, tuple)):
            if len(teacher) < 2 or not all(isinstance(t, nn.Module) for t in teacher):
                fail("teacher", "a module or a list of two or more modules", teacher, exc=TypeError)
            if any(t is student for t in teacher):
                fail("teacher", "models other than the student", "a list holding the student")
            teacher = TeacherEnsemble(teacher, temperature if isinstance(temperature, (int, float)) else 1.0,
                                      "outputs" if task_loss == "mse" else "probabilities")
        if teacher is not None and not isinstance(teacher, nn.Module):
            fail("teacher", "a torch.nn.Module, a list of them, or None", type(teacher).__name__, exc=TypeError)
        if teacher is student:
            fail("teacher", "a model other than the student", "the student itself")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            fail("temperature", "a float > 0", temperature)
        check_fraction("alpha", alpha, closed_right=True)
        if task_loss is None and alpha < 1:
            fail("alpha", "1.0 when `task_loss` is None (label-free distillation has no task term)", alpha)
        if task_loss is not None and not callable(task_loss) and task_loss not in ("cross_entropy", "mse"):
            fail("task_loss", "'cross_entropy', 'mse', a callable fn(output, target) or None", task_loss)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            fail("lr", "a float > 0", lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            fail("weight_decay", "a float >= 0", weight_decay)
        check_int("ignore_index", ignore_index)
        check_int("num_classes", num_classes, minimum=2, allow_none=True)
        self.student = student
        object.__setattr__(self, "_teacher", None)  # outside the module tree: no state_dict keys, no DDP, no optim
        self.teacher = teacher
        self.temperature, self.alpha, self.task_loss_kind = float(temperature), float(alpha), task_loss
        self.ignore_index, self.lr, self.weight_decay = ignore_index, lr, weight_decay
        self.num_classes = num_classes
        self.features = feature_pairs(features, student, teacher)
        if self.features:
            check_choice("feature_loss", feature_loss, FEATURE_LOSSES)
            if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or feature_weight < 0:
                fail("feature_weight", "a float >= 0", feature_weight)
        self.feature_loss_kind, self.feature_weight = feature_loss, float(feature_weight)
        # student-side state: trained with the student, saved in checkpoints
        self.adapters = (make_adapters(self.features, student, teacher)
                         if teacher is not None and feature_loss != "attention" else nn.ModuleDict())
        if not isinstance(cache_teacher, bool):
            fail("cache_teacher", "a bool", cache_teacher, exc=TypeError)
        if cache_teacher and self.features:
            fail("cache_teacher", "False with `features`", cache_teacher,
                  hint="intermediate teacher features are not cached; drop one of the two")
        cache_dtype = check_storage(cache_max_bytes, cache_dtype, cache_top_k, prefix="cache_")
        if not isinstance(cache_in_checkpoint, bool):
            fail("cache_in_checkpoint", "a bool", cache_in_checkpoint, exc=TypeError)
        if cache_in_checkpoint and not cache_teacher:
            fail("cache_in_checkpoint", "False unless `cache_teacher=True`", True, hint="set cache_teacher=True")
        if cache_top_k is not None and not cache_teacher:
            fail("cache_top_k", "None unless `cache_teacher=True`", cache_top_k, hint="set cache_teacher=True")
        if cache_top_k is not None and task_loss == "mse":
            fail("cache_top_k", "None with task_loss='mse'", cache_top_k,
                  hint="regression outputs are not logits; cache them in full")
        self.teacher_cache = (TeacherCache(cache_max_bytes, cache_dtype, top_k=cache_top_k,
                                           temperature=self.temperature) if cache_teacher else None)
        self.cache_in_checkpoint = cache_in_checkpoint
        if transfer is not None:
            check_choice("transfer", transfer, ("mixup",))
        check_int("transfer_size", transfer_size, minimum=1)
        check_int("seed", seed)
        self.transfer, self.transfer_size, self.seed = transfer, transfer_size, seed
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

    @override
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ------------------------------------------------------------------ overridable steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the student."""
        return self.student(*args, **kwargs)

    def unpack_batch(self, batch: Any) -> tuple[Any, Any]:
        """Split a batch into ``(inputs, targets)``; ``targets`` is ``None`` for unlabeled batches."""
        if isinstance(batch, (tuple, list)):
            return (batch[0], batch[1]) if len(batch) > 1 else (batch[0], None)
        return batch, None

    def student_forward(self, inputs: Any) -> Tensor:
        return self.student(inputs)

    def teacher_forward(self, inputs: Any) -> Tensor:
        assert self.teacher is not None  # `setup` refuses to fit without one
        with torch.no_grad():
            return self.teacher(inputs)

    def _mask(self, outputs: Tensor, targets: Tensor | None) -> Tensor | None:
        if targets is None or outputs.dim() < 3:
            return None
        return targets != self.ignore_index  # (B, T): padding positions count in neither loss

    def task_loss(self, student_out: Tensor, targets: Tensor) -> Tensor:
        """Loss against the labels (cross entropy over the last dimension, MSE, or the user's function)."""
        if callable(self.task_loss_kind):
            return self.task_loss_kind(student_out, targets)
        if self.task_loss_kind == "mse":
            return F.mse_loss(student_out, targets)
        return F.cross_entropy(student_out.reshape(-1, student_out.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=self.ignore_index)

    def distillation_loss(self, student_out: Tensor, teacher_out: Tensor, targets: Tensor | None) -> Tensor:
        """Soft-target KL scaled by ``T^2`` (MSE for regression)."""
        if self.task_loss_kind == "mse":
            return mse_distillation_loss(student_out, teacher_out)
        return kd_loss(student_out, teacher_out, self.temperature, self._mask(student_out, targets))

    def feature_distillation_loss(self, student_features: dict[str, Tensor],
                                  teacher_features: dict[str, Tensor]) -> Tensor:
        """Sum over the ``features`` pairs of the distance between adapted student and teacher features."""
        total: Tensor | None = None
        for s_name, t_name in self.features.items():
            s_feat, t_feat = student_features[s_name], teacher_features[t_name].detach()
            if self.feature_loss_kind != "attention":
                s_feat = self.adapters[adapter_key(s_name)](s_feat)
            dim = channel_dim(self.student.get_submodule(s_name))
            term = feature_loss(s_feat, t_feat, self.feature_loss_kind, dim)
            total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def losses(self, batch: Any) -> dict[str, Tensor]:
        """All loss parts for one batch: ``loss``, ``kd_loss`` and (when used) ``task_loss``, ``feature_loss``."""
        inputs, targets = self.unpack_batch(batch)
        with capture(self.student, list(self.features)) as s_feats:
            student_out = self.student_forward(inputs)
        assert self.teacher is not None  # `setup` refuses to fit without one
        with capture(self.teacher, list(self.features.values())) as t_feats:
            teacher_out = self._teacher_outputs(inputs)
        parts = {"kd_loss": self.distillation_loss(student_out, teacher_out, targets)}
        loss = self.alpha * parts["kd_loss"]
        if self.features:
            parts["feature_loss"] = self.feature_distillation_loss(s_feats, t_feats)
            loss = loss + self.feature_weight * parts["feature_loss"]
        if self.transfer is not None and self.training:
            mixed = self.mixup_inputs(inputs)
            parts["transfer_loss"] = self.distillation_loss(self.student_forward(mixed), self.teacher_forward(mixed),
                                                            None)
            loss = loss + self.alpha * parts["transfer_loss"]
        if self.alpha < 1:
            if targets is None:
                fail("batch", "(inputs, targets) when alpha < 1", "a batch without targets",
                      hint="set alpha=1.0 and task_loss=None for label-free distillation")
            parts["task_loss"] = self.task_loss(student_out, targets)
            loss = loss + (1 - self.alpha) * parts["task_loss"]
        parts["loss"] = loss
        return parts

    def mixup_inputs(self, inputs: Tensor) -> Tensor:
        """``transfer_size`` convex mixes of two random inputs of the batch (seeded by ``seed`` and the step)."""
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            fail("transfer", "None for inputs that are not floating-point tensors", self.transfer,
                  hint="mixup mixes inputs; token ids or structured batches cannot be mixed")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        n, k = inputs.shape[0], self.transfer_size
        a, b = torch.randint(n, (k,), generator=g), torch.randint(n, (k,), generator=g)
        lam = torch.rand((k,) + (1,) * (inputs.dim() - 1), generator=g).to(inputs.device, inputs.dtype)
        return lam * inputs[a.to(inputs.device)] + (1 - lam) * inputs[b.to(inputs.device)]

    def _teacher_outputs(self, inputs: Any) -> Tensor:
        cache = self.teacher_cache
        if cache is None or not self.training or not isinstance(inputs, Tensor):
            return self.teacher_forward(inputs)
        if not cache.enabled:  # the same representation as while it was on
            return cache.round_trip(self.teacher_forward(inputs))
        keys = cache.keys(inputs)
        cached = cache.lookup(keys)
        if cached is not None:
            return cached.to(self.device)
        return cache.add(keys, self.teacher_forward(inputs))  # as a hit would give them

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
            checkpoint["litcompress_teacher_cache"] = self.teacher_cache.state_dict(self.cache_in_checkpoint)

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
        student_out = self.student_forward(inputs)
        teacher_out = self.teacher_forward(inputs) if self.teacher is not None else None
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
        if targets is not None:
            for out, collection, prefix in ((student_out, self.val_metrics, ""),
                                            (teacher_out, self.teacher_val_metrics, "teacher/")):
                if out is not None:
                    collection(out.argmax(-1).reshape(-1), targets.reshape(-1))
                    self.log_dict(collection)
                    self.log(f"{prefix}val/loss", self.task_loss(out, targets))
        if teacher_out is not None:
            self.val_agreement(student_out.argmax(-1).reshape(-1), teacher_out.argmax(-1).reshape(-1))
            self.log("val/agreement", self.val_agreement)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the student's trainable parameters and the feature adapters (all this module registers)."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                 weight_decay=self.weight_decay)
