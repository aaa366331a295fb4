"""`DistillationModule(features=...)` with `ChannelPruning` on a distilled layer: the feature adapter follows the
layer's channels (masked with them, cut when they are removed, mid-fit or at the end), so the adapted feature loss
of the smaller model equals the masked model's, and later fits run; where it cannot follow, the fit is refused
before its first step."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from litcompress import ChannelPruning, DistillationModule, Pruning
from tests.helpers import Crash, Interrupted, fit
from tests.models import MLP, ZOO, ConvNet

pytest.importorskip("torch_pruning")

CASES = {  # model -> (teacher, student, {student layer: teacher layer}, the student layer's Module)
    "mlp": (lambda: MLP(16, 64), lambda: MLP(16, 32), {"net.0": "net.0"}, lambda s: s.net[0]),
    "cnn": (lambda: ConvNet(width=16), lambda: ConvNet(width=8), {"block.0": "block.0"}, lambda s: s.block[0]),
}


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class Probe(Callback):
    """The loss parts on a fixed batch (eval mode, no gradients): at every step while `pruning` still holds its
    masks (`masked=True`), or at the first step after it removed them (`masked=False`); and at the end of the fit.
    Placed before `pruning` in `callbacks`, it sees the masked model of the step the channels are removed in;
    placed after it, the smaller model of that same step."""

    def __init__(self, module: DistillationModule, batch, pruning: ChannelPruning, masked: bool) -> None:
        self.module, self.batch, self.pruning, self.masked = module, batch, pruning, masked
        self.at_removal: dict[str, float] | None = None
        self.at_end: dict[str, float] | None = None

    def _parts(self) -> dict[str, float]:
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return {k: float(v) for k, v in self.module.losses(self.batch).items()}
        finally:
            self.module.train(was_training)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruner, removed = self.pruning.pruner, bool(self.pruning.removed)
        if (pruner is not None) if self.masked else (pruner is None and removed and self.at_removal is None):
            self.at_removal = self._parts()

    def on_train_end(self, trainer, pl_module) -> None:
        self.at_end = self._parts()


def _setup(name: str):
    torch.manual_seed(0)
    make_teacher, make_student, pairs, layer = CASES[name]
    teacher, student = make_teacher(), make_student()
    module = DistillationModule(student, teacher, features=pairs, lr=0.01)
    x, y = ZOO[name].data().tensors
    return module, (x[:16], y[:16]), pairs, layer


def _adapter(module: DistillationModule, pairs) -> nn.Linear:
    return module.adapters[next(iter(pairs)).replace(".", "__")].proj


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_adapter_follows_removal_at_the_end(tmp_path, name):
    module, batch, pairs, layer = _setup(name)
    width = _width(layer(module.student))
    pruning = ChannelPruning(0.5, start=0, end=1)
    before, after = Probe(module, batch, pruning, True), Probe(module, batch, pruning, False)
    fit(tmp_path, [before, pruning, after], model=name, module=module, max_epochs=2)
    kept = _width(layer(module.student))
    assert pruning.removed and kept < width
    assert _adapter(module, pairs).in_features == _adapter(module, pairs).weight.shape[1] == kept
    assert before.at_end is not None and after.at_end is not None
    assert after.at_end["feature_loss"] > 0
    for key in ("feature_loss", "loss"):  # the smaller model's adapted features are the masked model's
        assert after.at_end[key] == pytest.approx(before.at_end[key], rel=1e-5, abs=1e-7)
    fit(tmp_path / "again", [], model=name, module=module, max_epochs=1)  # a later fit trains the smaller model
    assert _adapter(module, pairs).in_features == kept


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_adapter_follows_removal_mid_fit(tmp_path, name):
    module, batch, pairs, layer = _setup(name)
    width = _width(layer(module.student))
    pruning = ChannelPruning(0.5, start=0, end=1, remove_at=2)
    before, after = Probe(module, batch, pruning, True), Probe(module, batch, pruning, False)
    trainer, _ = fit(tmp_path, [before, pruning, after], model=name, module=module, max_epochs=4)
    kept = _width(layer(module.student))
    adapter = _adapter(module, pairs)
    assert pruning.removed and kept < width and adapter.in_features == kept
    assert before.at_removal is not None and after.at_removal is not None
    for key in ("feature_loss", "loss"):  # at the removal step: masked, then smaller, at the same weights
        assert after.at_removal[key] == pytest.approx(before.at_removal[key], rel=1e-5, abs=1e-7)
    optimizer = trainer.optimizers[0]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters()}  # the adapter's new weight, not the old one, is trained
    assert optimizer.state[adapter.weight]["exp_avg"].shape == adapter.weight.shape  # its AdamW state carried
    fit(tmp_path / "again", [ChannelPruning(0.5, start=0, end=1)], model=name, module=module, max_epochs=2)
    assert _adapter(module, pairs).in_features == _width(layer(module.student)) < kept  # and follows again


def test_masked_adapter_columns_are_zero(tmp_path):
    module, _, pairs, layer = _setup("mlp")
    fit(tmp_path, [ChannelPruning(0.5, start=0, end=1, remove_channels=False)], module=module, max_epochs=2)
    pruned = (layer(module.student).weight == 0).all(dim=1)
    assert pruned.sum() == 16  # the layer keeps its size, masked
    assert (_adapter(module, pairs).weight[:, pruned] == 0).all()
    assert (_adapter(module, pairs).weight[:, ~pruned] != 0).any()


class Reported(nn.Module):
    """A block that reports a width (`out_features`) while its inner layer's channels are what is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 32)
        self.out_features = 32

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("case", ["identity", "inner"])
def test_refused_before_the_first_step_where_the_adapter_cannot_follow(tmp_path, case):
    torch.manual_seed(0)
    teacher = MLP(16, 64)
    if case == "identity":  # as wide as the teacher's layer: the adapter is the identity
        student, pairs, match = MLP(16, 64), {"net.0": "net.0"}, r"identity.*`net\.0`"
    else:
        student, pairs, match = nn.Sequential(Reported(), nn.ReLU(), nn.Linear(32, 4)), {"0": "net.0"}, "width"
    module = DistillationModule(student, teacher, features=pairs)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [Count(), ChannelPruning(0.5, start=0, end=1)], module=module, max_epochs=2)
    assert not steps
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())  # nothing changed


def test_resumed_after_a_mid_fit_removal_ends_as_an_uninterrupted_fit(tmp_path):
    """The checkpoint written after the removal holds the smaller adapter: the resumed fit loads into it."""
    runs = []
    for crash in (True, False):
        module, _, pairs, _ = _setup("mlp")
        callbacks = [ChannelPruning(0.5, start=0, end=1, remove_at=2)]
        if crash:
            with pytest.raises(Interrupted):
                fit(tmp_path / "a", [*callbacks, Crash(10, tmp_path / "c.ckpt")], module=module, max_epochs=4)
            module, _, pairs, _ = _setup("mlp")  # a fresh process: the module built at full size
            callbacks = [ChannelPruning(0.5, start=0, end=1, remove_at=2)]
            fit(tmp_path / "b", callbacks, module=module, max_epochs=4, ckpt_path=tmp_path / "c.ckpt")
        else:
            fit(tmp_path / "c", callbacks, module=module, max_epochs=4)
        runs.append(module.state_dict())
    assert _adapter(module, pairs).in_features == 16
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[0][key], value, rtol=1e-5, atol=1e-6)


def test_dead_channel_removal_leaves_the_adapter_usable(tmp_path):
    """`Pruning(remove_channels=True)`: a distilled layer's all-zero channels output their bias, which the bias-free
    adapter cannot absorb: they stay, and the module keeps working (before, the adapter was left stale)."""
    module, batch, pairs, layer = _setup("mlp")
    pruning = Pruning({r"net\.0": 0.97}, remove_channels=True, start=0, end=1)
    with pytest.warns(UserWarning, match="all-zero channels stay"):
        fit(tmp_path, [pruning], module=module, max_epochs=2)
    assert (layer(module.student).weight == 0).all(dim=1).any()  # some channels are all zero
    assert _adapter(module, pairs).in_features == _width(layer(module.student))
    assert torch.isfinite(module.losses(batch)["feature_loss"])
    fit(tmp_path / "again", [], module=module, max_epochs=1)
