"""Layouts a traced dependency graph cannot shrink (issue 22): a fit either leaves those channels alone with the
reason, decided before the first step, or checks the removal on the batches it saw, so it never ends with a model
that is wrong, smaller than reported, or fails later."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

from litcompress import ChannelPruning, Pruning, QuantizationAwareTraining
from tests.helpers import fit
from tests.models import LitClassifier

pytest.importorskip("torch_pruning")


class Gated(nn.Module):
    """Phi-3's fused ``gate_up_proj``: one Linear split by ``chunk(2)`` into ``a * silu(b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gate_up, self.down, self.head = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(16, 16), \
            nn.Linear(16, 4)

    def forward(self, x):
        a, b = self.gate_up(torch.relu(self.inp(x))).chunk(2, dim=-1)
        return self.head(torch.relu(self.down(a * F.silu(b))))


class Reshaped(nn.Module):
    """``fc2``'s 24 outputs are read by ``fc3`` as 4 rows of 6."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 24), nn.Linear(6, 1)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.fc3(h.view(x.shape[0], 4, 6)).flatten(1)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.hidden, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), \
            nn.Linear(16, 4)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.l2(torch.relu(self.l1(x)))))))


class Branchy(nn.Module):
    """A data-dependent branch: ``skip`` adds to ``fc1``'s channels only when the batch's first feature is positive
    on average (tracing on a batch that does not take it sees no coupling between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.skip, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if x[:, 0].mean() > 0:
            h = h + self.skip(x)
        return self.fc2(h)


class Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


def _fit(tmp_path, build, callbacks, **kwargs):
    torch.manual_seed(0)
    module = LitClassifier(build(), **kwargs.pop("module_kwargs", {}))
    return fit(tmp_path, callbacks, module=module, **kwargs)[1].model


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-4)


X = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("remove_at", [None, 2])
def test_gated_layer_keeps_its_channels_and_the_rest_is_removed_exactly(tmp_path, optimizer, remove_at):
    """Before: Torch-Pruning removed 75% of `gate_up` where 50% was masked and reported, and a mid-fit removal
    crashed Adam (its state sliced by the masked positions)."""
    kwargs = dict(start=0, end=1, remove_at=remove_at, verbose=False)
    with pytest.warns(UserWarning, match=r"model.gate_up: removing its channels is not exact.*keep 16"):
        removed = _fit(tmp_path / "r", Gated, [ChannelPruning(0.5, **kwargs)], max_epochs=3,
                       module_kwargs=dict(optimizer=optimizer))
    assert removed.gate_up.out_features == 32 and removed.down.in_features == 16
    assert removed.inp.out_features == 8 and removed.down.out_features == 8
    if remove_at is None:  # the same fit without the removal: the masked model, computed smaller
        masked = _fit(tmp_path / "m", Gated, [ChannelPruning(0.5, remove_channels=False, **kwargs | {
            "remove_at": None})], max_epochs=3, module_kwargs=dict(optimizer=optimizer))
        _same_outputs(masked, removed, X)


def test_gated_layer_with_dead_channel_removal(tmp_path):
    """Before: `Pruning(remove_channels=True)` crashed in the dead-channel fold ("cannot reshape tensor of 0
    elements")."""
    net = _fit(tmp_path, Gated, [Pruning({"gate_up": 0.97, "inp": 0.9}, start=0, end=1, remove_channels=True,
                                           verbose=False)], max_epochs=2)
    assert net.gate_up.out_features == 32
    assert net(X).shape == (8, 4)


def test_reshaped_outputs_are_refused_before_the_first_step(tmp_path):
    """Before: an IndexError in a mask update mid-fit; with `parameters="fc2"` the fit completed and inference failed
    on mismatched shapes."""
    steps = Steps()
    with pytest.raises(ValueError, match=r"model.fc2: `model.fc3` reads the channels reshaped"):
        _fit(tmp_path / "a", Reshaped, [ChannelPruning(0.5, parameters="fc2", start=1), steps])
    assert steps.steps == 0
    with pytest.warns(UserWarning, match="reshaped"):
        net = _fit(tmp_path / "b", Reshaped, [ChannelPruning(0.5, start=0, end=1, verbose=False)])
    assert net.fc2.out_features == 24 and net.fc1.out_features == 8 and net(X).shape == (8, 4)


def test_tied_weights_stay_tied(tmp_path):
    """Before: the removal untied `l1.weight` and `l2.weight`, and the two copies trained apart."""
    with pytest.warns(UserWarning, match=r"`model.l1.weight` and `model.l2.weight` are one tensor \(tied weights\)"):
        net = _fit(tmp_path, Tied, [ChannelPruning(0.5, start=0, end=1, verbose=False)])
    assert net.l2.weight is net.l1.weight and net.l1.weight.shape == (16, 16)
    assert net.hidden.out_features == 8


def test_a_branch_tracing_did_not_see_keeps_its_channels(tmp_path):
    """Before: only the traced branch shrank, and inputs taking the other branch failed after the fit. Now the
    removal is tried on the last batches of the fit first; the group it would break stays masked."""
    quiet = torch.full((4, 16), -1.0)  # takes no branch: fc1's channels look free
    kwargs = dict(start=0, end=1, example_input=quiet, verbose=False)
    with pytest.warns(UserWarning, match=r"stay masked \(zeros\), not removed.*`model.fc1`"):
        net = _fit(tmp_path / "r", Branchy, [ChannelPruning(0.5, **kwargs)])
    masked = _fit(tmp_path / "m", Branchy, [ChannelPruning(0.5, remove_channels=False, **kwargs)])
    assert net.fc1.out_features == 16
    for x in (quiet, -quiet):  # both branches
        _same_outputs(masked, net, x)


def test_a_branch_tracing_did_not_see_stops_a_mid_fit_removal(tmp_path):
    quiet = torch.full((4, 16), -1.0)
    with pytest.raises(RuntimeError, match=r"cannot be removed at `remove_at` \(nothing was changed\).*`model.fc1`"):
        _fit(tmp_path, Branchy, [ChannelPruning(0.5, start=0, end=1, remove_at=1, example_input=quiet,
                                                  verbose=False)])


@pytest.mark.parametrize("qat_first", [True, False])
@pytest.mark.parametrize("how", ["channels", "dead"])
def test_frozen_quantization_scales_shrink_at_the_end_of_the_fit(tmp_path, qat_first, how):
    """Before: frozen per-channel scales kept their old size when channels were removed at the end of the fit, so
    the model, `save_compressed` and `export_onnx` failed after `fit` returned."""
    from litcompress.export import export_onnx, load_compressed, save_compressed

    qat = QuantizationAwareTraining(freeze_observers=1, verbose=False)
    pruning = (ChannelPruning(0.5, start=0, end=1, verbose=False) if how == "channels" else
               Pruning({"model.net.0": 0.95}, start=0, end=1, remove_channels=True, verbose=False))
    torch.manual_seed(0)
    _, module = fit(tmp_path, [qat, pruning] if qat_first else [pruning, qat], model="mlp", max_epochs=3)
    assert pruning.removed and any(after < before for before, after in pruning.removed.values())
    net = module.model.eval()
    y = net(X)
    assert torch.isfinite(y).all()
    path = save_compressed(net, tmp_path / "m.safetensors")
    again = load_compressed(copy.deepcopy(net), path)
    assert all(a.shape == b.shape for a, b in zip(again.parameters(), net.parameters()))
    onnx = pytest.importorskip("onnxruntime")

    export_onnx(net, X, tmp_path / "m.onnx")
    session = onnx.InferenceSession(str(tmp_path / "m.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    assert out.shape == tuple(y.shape)
    assert float((torch.from_numpy(out) - y).abs().max()) < 0.05 * float(y.abs().max())


def test_bn_scale_without_batchnorm_is_refused_before_the_first_step(tmp_path):
    steps = Steps()
    with pytest.raises(ValueError, match=r"'bn_scale' only for layers followed by BatchNorm.*has no BatchNorm"):
        fit(tmp_path, [ChannelPruning(0.5, importance="bn_scale", start=1), steps], model="mlp")
    assert steps.steps == 0


@pytest.mark.parametrize("bad", ["shape", "dtype", "mapping"])
def test_an_input_the_model_cannot_take_is_named_not_blamed_on_tracing(tmp_path, bad):
    """Before: every tracing failure said "use an unstructured or N:M pattern"."""
    x = {"shape": torch.randn(4, 7), "dtype": torch.randn(4, 16, dtype=torch.float64),
         "mapping": {"inputs": torch.randn(4, 16)}}[bad]
    with pytest.raises(ValueError, match=r"`example_input` to be an input the model runs on.*the model fails on it") \
            as err:
        fit(tmp_path, [ChannelPruning(0.5, example_input=x)], model="mlp")
    assert "N:M" not in str(err.value)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_the_residual_stream_width_is_said_to_stay(family):
    """Before: the residual stream of a transformer was never pruned and nothing said so."""
    pytest.importorskip("transformers")
    from litcompress.sparsity.channels import ChannelPruner
    from tests.test_hf_models import bert, gpt2, ids, llama

    model = {"gpt2": gpt2, "bert": bert, "llama": llama}[family]().eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    pruner = ChannelPruner(model, ids(), layers, 0.5)
    residual = [n for n, why in pruner.skipped.items() if "residual stream" in why]
    last = {"gpt2": "mlp.c_proj", "bert": "output.dense", "llama": "mlp.down_proj"}[family]
    assert residual and all(n.endswith(last) for n in residual)
    assert len(residual) == 2  # one per block
    assert pruner.groups
