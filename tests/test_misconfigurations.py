"""Table-driven: every misconfiguration of the public API is a `ValueError`/`TypeError` naming the parameter (or
layer) and saying what to do, raised at construction or at `setup`, before any training step, with the model left
exactly as it was (same state_dict values, same module classes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from litcompress import (
    ChannelPruning,
    CompressionReport,
    DistillationModule,
    LowRankFactorization,
    Pruning,
    QuantizationAwareTraining,
)
from litcompress.distillation import FeatureDistillation, MixupTransfer, TeacherCache, kd_loss
from litcompress.export import export_onnx
from litcompress.quantization import QuantConfig
from litcompress.quantization.compact import load_compressed, save_compressed
from litcompress.schedules import get_schedule
from tests.models import MLP, LitClassifier, classification_data, trainer_kwargs

INF, NAN = math.inf, math.nan


@dataclass
class Case:
    id: str
    call: Callable[..., object]  # called with (model, tmp_path)
    exc: type[Exception]
    match: str


def _mlp_distill(**kwargs):
    return lambda model, tmp: DistillationModule(model, MLP(), **kwargs)


def _report(*args, **kwargs):
    return lambda model, tmp: CompressionReport(*args, **kwargs)


def _prune(*args, **kwargs):
    return lambda model, tmp: Pruning(*args, **kwargs)


def _channels(*args, **kwargs):
    return lambda model, tmp: ChannelPruning(*args, **kwargs)


def _lowrank(*args, **kwargs):
    return lambda model, tmp: LowRankFactorization(*args, **kwargs)


def _qat(**kwargs):
    return lambda model, tmp: QuantizationAwareTraining(**kwargs)


CONSTRUCTION = [
    # Pruning
    Case("pruning-sparsity-above-1", _prune(1.5), ValueError, r"`sparsity`.*\[0, 1\)"),
    Case("pruning-sparsity-negative", _prune(-0.1), ValueError, r"`sparsity`"),
    Case("pruning-sparsity-nan", _prune(NAN), ValueError, r"`sparsity`"),
    Case("pruning-sparsity-inf", _prune(INF), ValueError, r"`sparsity`"),
    Case("pruning-sparsity-str", _prune("0.5"), TypeError, r"`sparsity`"),
    Case("pruning-sparsity-none", _prune(None), TypeError, r"`sparsity`"),
    Case("pruning-sparsity-empty-map", _prune({}), ValueError, r"`sparsity`.*non-empty"),
    Case("pruning-sparsity-int-key", _prune({1: 0.5}), TypeError, r"`sparsity`.*name pattern"),
    Case("pruning-sparsity-map-value", _prune({"fc": 1.0}), ValueError, r"`sparsity\['fc'\]`"),
    Case("pruning-sparsity-map-nan", _prune({"fc": NAN}), ValueError, r"`sparsity\['fc'\]`"),
    Case("pruning-map-global", _prune({"fc": 0.5}, scope="global"), ValueError, r"`scope`"),
    Case("pruning-start-negative", _prune(0.5, start=-1), ValueError, r"`start`"),
    Case("pruning-start-float", _prune(0.5, start=1.5), TypeError, r"`start`"),
    Case("pruning-end-before-start", _prune(0.5, start=2, end=1), ValueError, r"`end`"),
    Case("pruning-frequency-zero", _prune(0.5, frequency=0), ValueError, r"`frequency`"),
    Case("pruning-interval", _prune(0.5, interval="batch"), ValueError, r"`interval`"),
    Case("pruning-scope", _prune(0.5, scope="local"), ValueError, r"`scope`"),
    Case("pruning-pattern", _prune(0.5, pattern="4:2"), ValueError, r"`pattern`"),
    Case("pruning-pattern-garbage", _prune(0.5, pattern="channels!"), ValueError, r"`pattern`"),
    Case("pruning-nm-sparsity", _prune(0.3, pattern="2:4"), ValueError, r"`sparsity`.*2:4"),
    Case("pruning-nm-global", _prune(pattern="2:4", scope="global"), ValueError, r"`scope`"),
    Case("pruning-importance", _prune(0.5, importance="gradient"), ValueError, r"`importance`"),
    Case("pruning-schedule", _prune(0.5, schedule="quadratic"), ValueError, r"`schedule`"),
    Case("pruning-parameters-int", _prune(0.5, parameters=123), TypeError, r"`parameters`"),
    Case("pruning-parameters-regex", _prune(0.5, parameters="fc("), ValueError, r"`parameters`"),
    Case("pruning-exclude-int", _prune(0.5, exclude=5), TypeError, r"`exclude`"),
    Case("pruning-seed", _prune(0.5, seed=1.5), TypeError, r"`seed`"),
    Case("pruning-rewind", _prune(0.5, rewind="yes"), TypeError, r"`rewind`"),
    Case("pruning-verbose", _prune(0.5, verbose="no"), TypeError, r"`verbose`"),
    Case("pruning-log-prefix", _prune(0.5, log_prefix=3), TypeError, r"`log_prefix`"),
    Case("pruning-channel-pattern", _prune(0.5, pattern="channel"), ValueError, r"`pattern`.*ChannelPruning"),
    Case("pruning-remove-channels", _prune(0.5, remove_channels="yes"), TypeError, r"`remove_channels`"),
    # ChannelPruning
    Case("channels-sparsity-map", _channels({"fc": 0.5}), TypeError, r"`sparsity`"),
    Case("channels-sparsity-one", _channels(1.0), ValueError, r"`sparsity`"),
    Case("channels-sparsity-bool", _channels(True), TypeError, r"`sparsity`"),
    Case("channels-importance", _channels(0.5, importance="movement"), ValueError, r"`importance`"),
    Case("channels-remove-at-zero", _channels(0.5, remove_at=0), ValueError, r"`remove_at`"),
    Case("channels-remove-at-kept", _channels(0.5, remove_at=2, remove_channels=False), ValueError,
         r"`remove_at`.*remove_channels=False"),
    Case("channels-remove-at-before-end", _channels(0.5, end=3, remove_at=2), ValueError, r"`remove_at`.*`end`"),
    Case("channels-end-before-start", _channels(0.5, start=2, end=1), ValueError, r"`end`"),
    Case("channels-interval", _channels(0.5, interval="batch"), ValueError, r"`interval`"),
    Case("channels-exclude-regex", _channels(0.5, exclude="fc("), ValueError, r"`exclude`"),
    Case("channels-verbose", _channels(0.5, verbose="no"), TypeError, r"`verbose`"),
    # LowRankFactorization
    Case("lowrank-nothing", _lowrank(), TypeError, r"`rank`.*exactly one"),
    Case("lowrank-two-targets", _lowrank(4, energy=0.9), ValueError, r"`rank`"),
    Case("lowrank-rank-zero", _lowrank(0), ValueError, r"`rank`"),
    Case("lowrank-rank-float", _lowrank(2.5), TypeError, r"`rank`"),
    Case("lowrank-ratio", _lowrank(rank_ratio=1.5), ValueError, r"`rank_ratio`"),
    Case("lowrank-energy", _lowrank(energy=0.0), ValueError, r"`energy`"),
    Case("lowrank-start", _lowrank(4, start=-1), ValueError, r"`start`"),
    Case("lowrank-interval", _lowrank(4, interval="batch"), ValueError, r"`interval`"),
    Case("lowrank-parameters", _lowrank(4, parameters=3), TypeError, r"`parameters`"),
    Case("lowrank-verbose", _lowrank(4, verbose="no"), TypeError, r"`verbose`"),
    # QuantizationAwareTraining
    Case("qat-weight-bits-1", _qat(weight_bits=1), ValueError, r"`weight_bits`"),
    Case("qat-weight-bits-16", _qat(weight_bits=16), ValueError, r"`weight_bits`"),
    Case("qat-weight-bits-float", _qat(weight_bits=8.0), TypeError, r"`weight_bits`"),
    Case("qat-activation-bits", _qat(activation_bits=0), ValueError, r"`activation_bits`"),
    Case("qat-granularity", _qat(weight_granularity="per_row"), ValueError, r"`weight_granularity`"),
    Case("qat-scale", _qat(scale="mse"), ValueError, r"`scale`"),
    Case("qat-start-negative", _qat(start=-1), ValueError, r"`start`"),
    Case("qat-freeze-before-start", _qat(start=2, freeze_observers=1), ValueError, r"`freeze_observers`"),
    Case("qat-freeze-bn-negative", _qat(freeze_bn=-1), ValueError, r"`freeze_bn`"),
    Case("qat-averaging-zero", _qat(averaging_constant=0.0), ValueError, r"`averaging_constant`"),
    Case("qat-averaging-nan", _qat(averaging_constant=NAN), ValueError, r"`averaging_constant`"),
    Case("qat-averaging-inf", _qat(averaging_constant=INF), ValueError, r"`averaging_constant`"),
    Case("qat-scale-lr-zero", _qat(scale_lr=0.0), ValueError, r"`scale_lr`"),
    Case("qat-scale-lr-inf", _qat(scale_lr=INF), ValueError, r"`scale_lr`"),
    Case("qat-scale-lr-nan", _qat(scale_lr=NAN), ValueError, r"`scale_lr`"),
    Case("qat-interval", _qat(interval="batch"), ValueError, r"`interval`"),
    Case("qat-parameters-int", _qat(parameters=123), TypeError, r"`parameters`"),
    Case("qat-exclude-regex", _qat(exclude="fc["), ValueError, r"`exclude`"),
    Case("qat-verbose", _qat(verbose=1), TypeError, r"`verbose`"),
    Case("quant-config-bits", lambda m, t: QuantConfig(weight_bits=9), ValueError, r"`weight_bits`"),
    # DistillationModule
    Case("kd-temperature-zero", _mlp_distill(temperature=0.0), ValueError, r"`temperature`"),
    Case("kd-temperature-inf", _mlp_distill(temperature=INF), ValueError, r"`temperature`.*finite"),
    Case("kd-temperature-nan", _mlp_distill(temperature=NAN), ValueError, r"`temperature`"),
    Case("kd-temperature-str", _mlp_distill(temperature="4"), TypeError, r"`temperature`"),
    Case("kd-alpha-above-1", _mlp_distill(alpha=1.5), ValueError, r"`alpha`"),
    Case("kd-alpha-nan", _mlp_distill(alpha=NAN), ValueError, r"`alpha`"),
    Case("kd-lr-zero", _mlp_distill(lr=0.0), ValueError, r"`lr`"),
    Case("kd-lr-inf", _mlp_distill(lr=INF), ValueError, r"`lr`.*finite"),
    Case("kd-lr-nan", _mlp_distill(lr=NAN), ValueError, r"`lr`"),
    Case("kd-weight-decay-negative", _mlp_distill(weight_decay=-1.0), ValueError, r"`weight_decay`"),
    Case("kd-weight-decay-inf", _mlp_distill(weight_decay=INF), ValueError, r"`weight_decay`"),
    Case("kd-feature-weight-nan", lambda m, t: FeatureDistillation({"net.0": "net.0"}, weight=NAN), ValueError,
         r"`weight`"),
    Case("kd-feature-weight-inf", lambda m, t: FeatureDistillation({"net.0": "net.0"}, weight=INF), ValueError,
         r"`weight`"),
    Case("kd-feature-loss", lambda m, t: FeatureDistillation({"net.0": "net.0"}, loss="l1"), ValueError, r"`loss`"),
    Case("kd-feature-pairs-empty", lambda m, t: FeatureDistillation({}), ValueError, r"`pairs`"),
    Case("kd-features-list", _mlp_distill(features=["net.0"]), TypeError, r"`features`"),
    Case("kd-features-unknown", _mlp_distill(features={"nope": "net.0"}), ValueError, r"`features`.*nope"),
    Case("kd-task-loss", _mlp_distill(task_loss="l1"), ValueError, r"`task_loss`"),
    Case("kd-no-task-alpha", _mlp_distill(task_loss=None, alpha=0.5), ValueError, r"`alpha`"),
    Case("kd-num-classes", _mlp_distill(num_classes=1), ValueError, r"`num_classes`"),
    Case("kd-ignore-index", _mlp_distill(ignore_index=0.5), TypeError, r"`ignore_index`"),
    Case("kd-cache-bytes", lambda m, t: TeacherCache(max_bytes=0), ValueError, r"`max_bytes`"),
    Case("kd-cache-dtype", lambda m, t: TeacherCache(dtype="int8"), ValueError, r"`dtype`"),
    Case("kd-cache-top-k", lambda m, t: TeacherCache(top_k=0), ValueError, r"`top_k`"),
    Case("kd-cache-flag", _mlp_distill(cache="yes"), TypeError, r"`cache`"),
    Case("kd-cache-temperature", _mlp_distill(cache=TeacherCache(top_k=2, temperature=1.0)), ValueError, r"`cache`"),
    Case("kd-transfer", _mlp_distill(transfer="mixup"), TypeError, r"`transfer`"),
    Case("kd-transfer-size", lambda m, t: MixupTransfer(size=0), ValueError, r"`size`"),
    Case("kd-transfer-seed", lambda m, t: MixupTransfer(seed=1.5), TypeError, r"`seed`"),
    Case("kd-shift-labels", _mlp_distill(shift_labels="yes"), TypeError, r"`shift_labels`"),
    Case("kd-student-type", lambda m, t: DistillationModule("model", m), TypeError, r"`student`"),
    Case("kd-teacher-is-student", lambda m, t: DistillationModule(m, m), ValueError, r"`teacher`"),
    Case("kd-teacher-list-of-one", lambda m, t: DistillationModule(MLP(), [m]), TypeError, r"`teacher`"),
    Case("kd-teacher-meta", lambda m, t: DistillationModule(MLP(), MLP().to("meta")), ValueError,
         r"`teacher`.*meta"),
    Case("teacher-cache-hit-rate", lambda m, t: TeacherCache(min_hit_rate=1.5), ValueError, r"`min_hit_rate`"),
    Case("teacher-cache-temperature", lambda m, t: TeacherCache(temperature=INF), ValueError, r"`temperature`"),
    Case("kd-loss-temperature", lambda m, t: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=NAN),
         ValueError, r"`temperature`"),
    # CompressionReport
    Case("report-shape-zero", _report(input_shape=[0, 16]), TypeError, r"`input_shape`"),
    Case("report-shape-and-input", _report(torch.zeros(2, 16), input_shape=[2, 16]), ValueError, r"`input_shape`"),
    Case("report-input-shape-list", _report([2, 16]), TypeError, r"`example_input`"),
    Case("report-input-str", _report(example_input="x"), TypeError, r"`example_input`"),
    Case("report-metrics-str", _report(metrics="val/acc"), TypeError, r"`metrics`"),
    Case("report-repeats", _report(repeats=0), ValueError, r"`repeats`"),
    Case("report-filename", _report(filename="report.txt"), ValueError, r"`filename`"),
    Case("report-latency", _report(latency="yes"), TypeError, r"`latency`"),
    # schedules and files
    Case("schedule-name", lambda m, t: get_schedule("quadratic"), ValueError, r"`schedule`"),
    Case("load-model-none", lambda m, t: load_compressed(None, t / "x.safetensors"), TypeError, r"`model`"),
    Case("save-model-none", lambda m, t: save_compressed(None, t / "x.safetensors"), TypeError, r"`model`"),
    Case("load-missing-file", lambda m, t: load_compressed(m, t / "missing.safetensors"), ValueError,
         r"`path`.*missing\.safetensors"),
    Case("export-int64-input", lambda m, t: export_onnx(m, torch.zeros(2, 16, dtype=torch.long), t / "m.onnx"),
         ValueError, r"`example_input`"),
    Case("export-unwritable", lambda m, t: export_onnx(m, torch.zeros(2, 16), t / "no" / "dir" / "m.onnx"),
         ValueError, r"`path`"),
    Case("export-input-str", lambda m, t: export_onnx(m, "x", t / "m.onnx"), TypeError, r"`example_input`"),
    Case("export-model-none", lambda m, t: export_onnx(None, torch.zeros(2, 16), t / "m.onnx"), TypeError,
         r"`model`"),
]


def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(name, type(m)) for name, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, before) -> None:
    state, classes = before
    after_state, after_classes = _snapshot(model)
    assert after_classes == classes
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key


@pytest.mark.parametrize("case", CONSTRUCTION, ids=lambda c: c.id)
def test_construction_errors(case, tmp_path):
    torch.manual_seed(0)
    model = MLP()
    before = _snapshot(model)
    with pytest.raises(case.exc, match=case.match):
        case.call(model, tmp_path)
    _assert_unchanged(model, before)


class _Steps(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


class _Unsized(IterableDataset):
    def __iter__(self):
        data = classification_data((16,), n=32)
        for i in range(0, 32, 8):
            yield data.tensors[0][i:i + 8], data.tensors[1][i:i + 8]


class _FailsAtSetup(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        raise ValueError("Expected argument `other` to be valid, but got 1 (a later callback's setup)")


class _CustomLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _frozen_first(model):
    model.net[0].weight.requires_grad_(False)
    return model


def _custom_last(model):
    old = model.net[-1]
    model.net[-1] = _CustomLinear(old.in_features, old.out_features)
    return model


def _bias_kv(model):
    model.attn = nn.MultiheadAttention(16, 2, add_bias_kv=True)  # registered, never called by forward
    return model


@dataclass
class FitCase:
    id: str
    callbacks: Callable[[], list]
    exc: type[Exception]
    match: str
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m
    loader: str = "sized"
    module: Callable[[nn.Module], pl.LightningModule] = LitClassifier
    precision: str = "32-true"


FIT = [
    FitCase("pruning-no-match", lambda: [Pruning(0.5, parameters="nothing_here")], ValueError, r"`parameters`"),
    FitCase("pruning-start-after-fit", lambda: [Pruning(0.5, start=5)], ValueError, r"`start`"),
    FitCase("pruning-nm-indivisible", lambda: [Pruning(pattern="2:3", parameters=r"net\.0\.weight")], ValueError,
            r"net\.0\.weight.*3"),
    FitCase("pruning-movement-frozen", lambda: [Pruning(0.5, importance="movement", parameters=r"net\.0\.weight")],
            ValueError, r"net\.0\.weight.*requires_grad", prepare=_frozen_first),
    FitCase("pruning-unsized-loader", lambda: [Pruning(0.5)], ValueError, r"`interval`.*'step'.*without a length",
            loader="unsized"),
    FitCase("channels-no-match", lambda: [ChannelPruning(0.5, parameters="nothing_here")], ValueError,
            r"`parameters`"),
    FitCase("channels-start-after-fit", lambda: [ChannelPruning(0.5, start=5)], ValueError, r"`start`"),
    FitCase("channels-and-pruning-overlap", lambda: [Pruning(0.5), ChannelPruning(0.5)], ValueError,
            r"`parameters`.*disjoint"),
    FitCase("lowrank-no-match", lambda: [LowRankFactorization(4, parameters="nothing_here")], ValueError,
            r"`parameters`"),
    FitCase("lowrank-rank-too-big", lambda: [LowRankFactorization(64)], ValueError, r"`rank`"),
    FitCase("lowrank-start-after-fit", lambda: [LowRankFactorization(4, start=5)], ValueError, r"`start`"),
    FitCase("qat-unsized-loader", lambda: [QuantizationAwareTraining(start=1)], ValueError, r"`interval`",
            loader="unsized"),
    FitCase("qat-start-after-fit", lambda: [QuantizationAwareTraining(start=5)], ValueError, r"`start`"),
    FitCase("qat-two-callbacks", lambda: [QuantizationAwareTraining(), QuantizationAwareTraining(weight_bits=4)],
            ValueError, r"QuantizationAwareTraining.*net\.0"),
    FitCase("qat-linear-subclass", lambda: [QuantizationAwareTraining()], ValueError, r"net\.4.*_CustomLinear",
            prepare=_custom_last),
    FitCase("qat-bias-kv", lambda: [QuantizationAwareTraining()], ValueError, r"add_bias_kv.*attn",
            prepare=_bias_kv),
    FitCase("kd-teacher-dtype", lambda: [QuantizationAwareTraining()], ValueError, r"`teacher`.*float32.*float64",
            module=lambda m: DistillationModule(m, MLP().double())),
    FitCase("kd-teacher-dtype-bf16-true", lambda: [], ValueError, r"`teacher`.*bfloat16.*float32",
            module=lambda m: DistillationModule(m, MLP()), precision="bf16-true"),
    FitCase("later-callback-fails", lambda: [QuantizationAwareTraining(), Pruning(0.5), _FailsAtSetup()],
            ValueError, r"`other`"),
]


@pytest.mark.parametrize("case", FIT, ids=lambda c: c.id)
def test_setup_errors_leave_the_model_as_it_was(case, tmp_path):
    torch.manual_seed(0)
    model = case.prepare(MLP())
    before = _snapshot(model)
    steps = _Steps()
    data = classification_data((16,), n=32)
    loader = DataLoader(data, batch_size=8) if case.loader == "sized" else DataLoader(_Unsized(), batch_size=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision=case.precision), callbacks=[*case.callbacks(), steps])
    with pytest.raises(case.exc, match=case.match):
        trainer.fit(case.module(model), loader)
    assert steps.steps == 0
    _assert_unchanged(model, before)


def test_the_table_is_large():
    assert len(CONSTRUCTION) + len(FIT) >= 60
