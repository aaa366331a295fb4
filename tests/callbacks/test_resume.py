"""A fit resumed from a mid-epoch checkpoint says when it cannot be exact (the data loader cannot restore its
position), and is silent when it can."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from litcompress import Pruning, QuantizationAwareTraining
from tests.helpers import Crash, Interrupted
from tests.models import MLP, LitClassifier, ResumableLoader, classification_data, trainer_kwargs

DATA = classification_data((16,), n=64)


class _Stream(IterableDataset):
    """Batches of 16 with no length and no way to restore a position."""

    def __iter__(self):
        for i in range(0, 64, 16):
            yield DATA.tensors[0][i:i + 16], DATA.tensors[1][i:i + 16]


def _loader(kind):
    if kind == "plain":
        return DataLoader(DATA, batch_size=16)
    if kind == "stream":
        return DataLoader(_Stream(), batch_size=None)
    return ResumableLoader(DATA, 16)


def _callbacks():
    return [Pruning(0.5, interval="step", start=0, end=6, frequency=1, verbose=False),
            QuantizationAwareTraining(interval="step", start=2, verbose=False)]


def _resume_warnings(tmp_path, kind):
    limits = dict(max_steps=8) if kind == "stream" else dict(max_epochs=2)
    torch.manual_seed(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **limits), callbacks=[*_callbacks(), Crash(5, tmp_path / "c.ckpt")])
    with pytest.raises(Interrupted):
        trainer.fit(LitClassifier(MLP()), _loader(kind))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, **limits), callbacks=_callbacks())
        trainer.fit(LitClassifier(MLP()), _loader(kind), ckpt_path=tmp_path / "c.ckpt")
    assert trainer.global_step == 8
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(("kind", "expected"), [
    ("plain", "dataloader is not resumable"),  # Lightning's own warning, for loaders with a length
    ("stream", "litcompress: this fit resumes from a checkpoint written in the middle of an epoch"),
])
def test_mid_epoch_resume_without_a_stateful_loader_warns(tmp_path, kind, expected):
    messages = _resume_warnings(tmp_path, kind)
    assert any(expected in m for m in messages), messages
    assert sum("state_dict" in m and "resum" in m for m in messages) == 1  # said once, not once per callback


def test_mid_epoch_resume_with_a_stateful_loader_is_silent(tmp_path):
    messages = _resume_warnings(tmp_path, "stateful")
    assert not any("resum" in m and "state_dict" in m for m in messages), messages
