"""`CompressionReport` through real fits: baseline vs final numbers, JSON, logged scalars, resume, bad input."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from litcompress import CompressionReport, DistillationModule, Pruning, QuantizationAwareTraining
from litcompress.export import save_compressed
from tests.helpers import Crash, Interrupted, RecordingLogger, StepCounter, fit
from tests.models import MLP, LitClassifier, classification_data

X = classification_data((16,)).tensors[0][:8]
KEYS = {"schema", "baseline_kind", "baseline", "final", "metrics", "rows", "note", "global_step"}


def report(**kwargs):
    kwargs.setdefault("example_input", X)
    kwargs.setdefault("repeats", 2)
    return CompressionReport(**kwargs)


def test_pruned_and_quantized_fit_reports_measured_numbers(tmp_path):
    rep, logger = report(metrics=["val/acc", "val/loss"]), RecordingLogger()
    trainer, module = fit(tmp_path, [Pruning(0.75, scope="layer", schedule="one_shot"), QuantizationAwareTraining(),
                                     rep],
                          num_sanity_val_steps=-1, logger=logger)
    data = json.loads((tmp_path / "compression_report.json").read_text())
    assert set(data) == KEYS and data["schema"] == 1 and data["baseline_kind"] == "before"
    before, after = data["baseline"], data["final"]
    weights = [p for p in module.parameters() if p.dim() >= 2]
    zeros = sum(int((p == 0).sum()) for p in weights)
    assert before["nonzero"] == before["parameters"] == sum(p.numel() for p in module.parameters())
    assert after["parameters"] - after["nonzero"] == zeros == sum(round(0.75 * p.numel()) for p in weights)
    assert after["compact_bytes"] == save_compressed(module, tmp_path / "m.safetensors").stat().st_size
    assert {layer["bits"] for layer in after["layers"]} == {8} and before["bits_per_weight"] == 32.0
    assert after["quantized"] and after["latency_onnx"] > 0 and before["latency_onnx"] > 0
    assert after["latency_onnx_fp32"] > 0 and before["latency_onnx_fp32"] is None  # the int8 vs fp32 question
    assert after["sparse_flops"] < after["flops"] == before["flops"]
    # baseline metrics: the full sanity-check validation before training; final: the last validation
    assert data["note"] == "" and data["metrics"]["after"]["val/acc"] == pytest.approx(
        float(trainer.callback_metrics["val/acc"]))
    assert data["metrics"]["before"]["val/acc"] is not None
    logged = {k: v for _, m in logger.records for k, v in m.items() if k.startswith("compression/")}
    assert logged["compression/size_ratio"] == pytest.approx(after["compact_bytes"] / before["compact_bytes"])
    assert logged["compression/sparsity"] == pytest.approx(zeros / after["parameters"])
    assert (tmp_path / "compression_layers.png").stat().st_size > 1000
    assert (tmp_path / "compression_tradeoff.png").stat().st_size > 1000


def test_json_schema_and_csv_logger(tmp_path):
    fit(tmp_path, [report(metrics=["val/acc"], plots=False)], logger=CSVLogger(tmp_path, name="csv", version=0))
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"compression/size_ratio", "compression/sparsity", "compression/latency_ratio_eager"} <= set(logged)
    assert (tmp_path / "csv" / "version_0" / "compression_report.json").exists()  # next to the logs
    data = json.loads((tmp_path / "csv" / "version_0" / "compression_report.json").read_text())
    summary_fields = {"parameters": int, "nonzero": int, "bits_per_weight": float, "compact_bytes": int,
                      "fp32_bytes": int, "flops": int, "sparse_flops": int, "batch_size": int, "quantized": bool,
                      "sparsity": float, "layers": list}
    for side in ("baseline", "final"):
        for key, kind in summary_fields.items():
            assert isinstance(data[side][key], kind), (side, key)
        assert data[side]["latency_eager"] > 0 and data[side]["latency_onnx"] is None  # float model: no ORT
        for layer in data[side]["layers"]:
            assert set(layer) == {"name", "parameters", "nonzero", "bits", "sparsity"}
    for row in data["rows"]:
        assert set(row) == {"name", "before", "after", "ratio", "kind"}
    assert [r["name"] for r in data["rows"]][-1] == "val/acc" and isinstance(data["global_step"], int)


def test_distillation_baseline_is_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher, student = MLP(16, 64), MLP(16, 8)
    rep = report(metrics=["val/acc", "val/f1"], plots=False)
    fit(tmp_path, [rep], module=DistillationModule(student, teacher))
    data = rep.report
    assert data["baseline_kind"] == "teacher"
    assert data["baseline"]["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert data["final"]["parameters"] == sum(p.numel() for p in student.parameters())
    x, y = classification_data((16,), n=64).tensors  # the data `fit` trains and validates on
    with torch.no_grad():
        teacher_acc = float((teacher(x).argmax(1) == y).float().mean())
    assert data["metrics"]["before"]["val/acc"] == pytest.approx(teacher_acc)
    assert data["metrics"]["before"]["val/f1"] is not None and data["metrics"]["after"]["val/f1"] is not None


def test_partial_baseline_is_noted_and_unknown_metric_warns(tmp_path):
    rep = report(metrics=["val/acc", "val/typo"], plots=False)
    with pytest.warns(UserWarning, match=r"\['val/typo'\] were never logged; logged keys are .*'val/acc'"):
        fit(tmp_path, [rep], n=128, num_sanity_val_steps=1)  # 2 validation batches, 1 checked before training
    assert rep.report["note"].startswith("baseline metrics from 1 of 2 validation batches")
    assert rep.report["metrics"]["before"]["val/acc"] is not None
    assert rep.report["metrics"]["after"]["val/typo"] is None


def test_resumed_fit_reports_against_the_original_model(tmp_path):
    def run(ckpt_path=None, crash=None):
        rep = report(plots=False)
        fit(tmp_path, [Pruning(0.5, schedule="one_shot"), rep] + ([crash] if crash else []), ckpt_path=ckpt_path,
            max_epochs=3)
        return rep

    with pytest.raises(Interrupted):
        run(crash=Crash(6, tmp_path / "cut.ckpt"))
    resumed = run(ckpt_path=tmp_path / "cut.ckpt")
    assert resumed.report["baseline"]["sparsity"] == 0.0  # measured before pruning, not at the resume
    assert resumed.report["final"]["sparsity"] > 0.4


def test_bad_input_fails_before_training(tmp_path):
    steps = StepCounter()
    with pytest.raises(ValueError, match=r"`example_input` to be an input the model accepts.*shape \(2, 3\)"):
        fit(tmp_path, [report(example_input=torch.randn(2, 3)), steps])
    assert steps.batches == 0
    data = classification_data((16,))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(*data.tensors))

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[CompressionReport(), steps], default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=r"`example_input` to be a batch when the train dataloader is not a map-style"):
        trainer.fit(LitClassifier(MLP()), torch.utils.data.DataLoader(Stream(), batch_size=16))
    assert steps.batches == 0
    for kwargs, exc, match in (({"metrics": "val/acc"}, TypeError, "`metrics`"),
                               ({"repeats": 0}, ValueError, "`repeats`"),
                               ({"filename": "report.txt"}, ValueError, "`filename`"),
                               ({"example_input": [1.0]}, TypeError, "`example_input`"),
                               ({"plots": "yes"}, TypeError, "`plots`")):
        with pytest.raises(exc, match=match):
            CompressionReport(**kwargs)


class BreakInput(pl.Callback):
    def __init__(self, rep):
        self.rep = rep

    def on_train_start(self, trainer, pl_module):  # after the baseline was measured
        self.rep._batch = torch.randn(2, 3)  # the final measurement will fail


def test_a_failing_report_never_crashes_the_fit(tmp_path):
    rep = report(plots=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [rep, BreakInput(rep)])
    assert trainer.state.finished and rep.report is None
    assert any("CompressionReport could not be completed" in str(w.message) for w in caught)


def test_example_input_array_is_the_default(tmp_path):
    module = LitClassifier(MLP())
    module.example_input_array = X[:3]
    rep = CompressionReport(latency=False, plots=False)
    fit(tmp_path, [rep], module=module)
    assert rep.report["final"]["batch_size"] == 3 and rep.report["final"]["latency_eager"] is None


@pytest.mark.parametrize("distil", [False, True])
def test_tradeoff_plot_labels_match_the_table(tmp_path, monkeypatch, distil):
    from litcompress.report import plots

    seen = []
    monkeypatch.setattr(plots, "plot_tradeoff", lambda points, path, **kw: seen.append([p[0] for p in points]))
    module = None
    if distil:
        module = DistillationModule(MLP(), MLP(hidden=64), num_classes=4)
    fit(tmp_path, [report(metrics=["val/acc"], plots=True)], module=module, max_epochs=1, num_sanity_val_steps=-1)
    assert seen == [["teacher", "student"] if distil else ["before", "after"]]


def test_without_input_the_first_training_batch_is_measured_and_draws_are_unchanged(tmp_path):
    rep = CompressionReport(latency=False, plots=False)
    _, with_report = fit(tmp_path, [rep], module=LitClassifier(MLP()), max_epochs=2)
    assert rep.report["final"]["batch_size"] == 16 and rep.report["final"]["flops"] > 0
    _, without = fit(tmp_path, [], module=LitClassifier(MLP()), max_epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(with_report.state_dict().values(), without.state_dict().values()))


class DictBatches(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = classification_data((16,)).tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


class DictModule(LitClassifier):
    def forward(self, features):  # keyword inputs, as a Hugging Face model takes them
        return self.model(features)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["features"]), batch["labels"])


def test_dict_batches_are_measured_as_keyword_inputs(tmp_path):
    rep = CompressionReport(latency=True, repeats=2, plots=False, metrics=[])
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[Pruning(0.5, schedule="one_shot", verbose=False), QuantizationAwareTraining(
                             verbose=False), rep], default_root_dir=tmp_path)
    trainer.fit(DictModule(MLP()), torch.utils.data.DataLoader(DictBatches(), batch_size=8))
    final = rep.report["final"]
    assert final["batch_size"] == 8 and final["latency_eager"] > 0 and final["latency_onnx"] > 0  # ORT ran it
    assert final["sparsity"] > 0.4 and final["quantized"]
