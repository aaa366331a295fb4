"""`examples/cli.py`: each YAML config in `examples/configs/` runs through LightningCLI and does what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litcompress import CompressionReport, DistillationModule, Pruning, QuantizationAwareTraining

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def cli_main():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from cli import main
        from mnist5k import TeacherCNN
    finally:
        sys.path.pop(0)
    return main, TeacherCNN


def test_every_config_is_tested():
    assert {c.stem for c in CONFIGS} == {"prune", "qat", "distill", "all"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_runs_a_few_steps(config, tmp_path, cli_main, monkeypatch):
    main, teacher_cls = cli_main
    monkeypatch.chdir(tmp_path)  # the configs' relative paths start here, and nothing but logs may land here
    (tmp_path / "mnist_pipeline_out").mkdir()
    saved = teacher_cls().state_dict()
    torch.save(saved, tmp_path / "mnist_pipeline_out" / "teacher.pt")  # where the configs look for it
    args = ["fit", "--config", str(config), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--data.limit=256"]
    cli = main(args)
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    report = callbacks[CompressionReport].report
    log_dir = Path(cli.trainer.log_dir).resolve()
    assert log_dir == tmp_path / "lightning_logs" / config.stem / "version_0"  # Lightning's log directory
    assert {"config.yaml", "compression_report.json", "metrics.csv", "compression_layers.png"} <= {
        p.name for p in log_dir.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs", "mnist_pipeline_out"]
    assert report is not None
    final = report["final"]
    if Pruning in callbacks:
        target = callbacks[Pruning].sparsity if isinstance(callbacks[Pruning].sparsity, float) else None
        assert final["sparsity"] > 0.3 and (target is None or final["sparsity"] <= target)
    if QuantizationAwareTraining in callbacks:
        bits = {layer["name"]: layer["bits"] for layer in final["layers"]}
        first = "features.0.weight" if "features.0.weight" in bits else "model.features.0.weight"  # student, model
        assert final["quantized"] and bits.pop(first) == (32 if "<first>" in config.read_text() else 8)
        assert set(bits.values()) == {8}
    else:
        assert not final["quantized"]
    if isinstance(cli.model, DistillationModule):
        assert report["baseline_kind"] == "teacher"
        loaded = cli.model.teacher.state_dict()
        assert all(torch.equal(v, saved[k]) for k, v in loaded.items())
    else:  # prune.yaml and qat.yaml compress the trained model the file holds, not a fresh one
        assert report["baseline_kind"] == "before" and report["baseline"]["parameters"] == 317_066
        trained = cli.model.model.state_dict()
        assert max(float((trained[k] - saved[k]).abs().max()) for k in saved if k.endswith("bias")) < 0.01


def test_missing_teacher_file_is_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "cli.py"), "fit", "--config",
                           str(ROOT / "examples" / "configs" / "distill.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith("error: teacher weights 'mnist_pipeline_out/teacher.pt' not found"), lines
    assert len(lines) <= 3, lines


def test_print_config_lists_every_option(cli_main, capsys):
    main, _ = cli_main
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "examples" / "configs" / "all.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for option in ("temperature: 4.0", "cache: true", "transfer: null", "class_path: litcompress.Pruning",
                   "schedule: cubic",
                   "class_path: litcompress.QuantizationAwareTraining", "freeze_observers: 39",
                   "class_path: litcompress.CompressionReport"):
        assert option in out, option
