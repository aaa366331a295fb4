"""Test-only callbacks and loggers that observe a fit from the outside."""

from __future__ import annotations

import socket

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from tests.models import ZOO, LitClassifier, ResumableLoader, classification_data, trainer_kwargs


class RecordingLogger(Logger):
    """Keeps every `log_metrics` call as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.records if key in m]


class ZeroWatch(pl.Callback):
    """After every optimizer step, checks that weights once zero stay zero (nothing revives them)."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names = names
        self.zeros: dict[str, torch.Tensor] = {}
        self.checks = 0
        self.revived = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, p in pl_module.named_parameters():
            if p.dim() < 2 or (self.names is not None and name not in self.names):
                continue
            now = (p == 0).cpu()
            if name in self.zeros:
                self.revived += int((self.zeros[name] & ~now).sum())
                self.checks += 1
            self.zeros[name] = now


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1


class Interrupted(RuntimeError):
    pass


class Crash(pl.Callback):
    """Saves a checkpoint at `step` and then fails, as a killed job would."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Interrupted(f"stopped at step {self.step}")


def fit(tmp_path, callbacks, model="mlp", n=64, batch_size=16, seed=0, ckpt_path=None, lr=0.05, optimizer="sgd",
        module=None, **overrides):
    """Fit a zoo model with resumable deterministic data; returns (trainer, module)."""
    torch.manual_seed(seed)
    entry = ZOO[model]
    module = module or LitClassifier(entry.build(), lr=lr, optimizer=optimizer)
    data = entry.data() if n is None else (classification_data((16,), n=n) if model == "mlp" else entry.data())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=list(callbacks))
    trainer.fit(module, ResumableLoader(data, batch_size), ResumableLoader(data, 64), ckpt_path=ckpt_path)
    return trainer, module


class TeacherCalls(pl.Callback):
    """Counts a teacher's forward calls per training epoch."""

    def __init__(self, teacher):
        self.per_epoch: dict[int, int] = {}
        self.epoch = 0
        teacher.register_forward_hook(lambda *a: self.per_epoch.__setitem__(self.epoch,
                                                                             self.per_epoch.get(self.epoch, 0) + 1))

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch = trainer.current_epoch

    def on_validation_start(self, trainer, pl_module):
        self.epoch = -1  # validation calls are not counted


def free_port() -> int:
    """A TCP port nothing listens on, for a process group's rendezvous in a test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
