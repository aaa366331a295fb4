"""Example inputs for callbacks that must run the model before training (tracing, measuring): the first training
batch, read without touching the fit's random state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate

from litcompress._validation import fail

__all__ = ["first_batch_inputs", "model_inputs"]


def first_batch_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> Any:
    """The model inputs of the first training batch, read from the dataset in order (the sampler is not touched, so
    the fit's random draws do not change): ``unpack_batch(batch)[0]`` when the module has it (a
    :class:`~litcompress.modules.DistillationModule`), else a tuple's first item, a mapping's tensors but its labels,
    or the batch itself."""
    hint = f"pass {who}(example_input=...) or set `self.example_input_array` in your LightningModule"
    loader = _train_loader(trainer)
    dataset: Any = getattr(loader, "dataset", None)
    batch_size = getattr(loader, "batch_size", None)
    if (not isinstance(batch_size, int) or isinstance(dataset, IterableDataset)
            or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"))):
        fail("example_input", "a batch when the train dataloader is not a map-style DataLoader with a batch size",
             None, exc=TypeError, hint=hint)
    collate = getattr(loader, "collate_fn", None) or default_collate
    return model_inputs(collate([dataset[i] for i in range(min(batch_size, len(dataset)))]), pl_module)


def model_inputs(batch: Any, pl_module: pl.LightningModule) -> Any:
    """The model inputs of a training ``batch`` (the rule of :func:`first_batch_inputs`)."""
    unpack = getattr(pl_module, "unpack_batch", None)
    if callable(unpack):
        return unpack(batch)[0]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if isinstance(v, Tensor) and k not in ("labels", "label")}
    return batch


def _train_loader(trainer: pl.Trainer) -> Any:
    """The train dataloader as the user gave it (or as the module's / datamodule's hook returns it).

    Read from Lightning's data source (private: ``fit_loop._data_source``) rather than ``trainer.train_dataloader``:
    loading that one early (through ``trainer.estimated_stepping_batches``) in ``on_fit_start`` of a resumed fit
    loses the restored position of a stateful loader, and the resumed fit is no longer exact (measured:
    ``tests/callbacks/test_channel_pruning.py``). Falls back to the public route if the private one is gone.
    """
    source = getattr(getattr(trainer.fit_loop, "_data_source", None), "dataloader", None)
    if callable(source):
        try:
            return source()
        except Exception:
            pass
    _ = trainer.estimated_stepping_batches  # loads the train dataloader (Lightning's own lazy setup)
    return trainer.train_dataloader
